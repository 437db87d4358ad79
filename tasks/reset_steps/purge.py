"""The deferred purge: a course-wide job's pre-job rows, deleted in id order, chunk by chunk.

Course-wide jobs over everyone assigned clear in two phases (decision record 0002). Progress
rows are written over months, so one learner's rows lie scattered across the table; deleting
them learner batch by learner batch would visit nearly every heap page once per batch. Instead:

1. *Learner batches* restart each learner's attempt (assignment, analytics, notification row)
   and clear only the rows newer than the job's watermark (activity recorded since the job
   started: few, found through the index).
2. *Purge batches*, released when every learner batch has finished, clear each component's rows
   at or below the watermark in id order, which is insertion order and so nearly physical
   order: each page is visited about once, as by one set-based statement.

Rows at or below the watermark exist only for learners who had progress when the job started,
and every such learner is targeted, so the purge needs no join; learners of a dead-lettered
batch are excluded by their id range (:func:`models.batches.rows_to_purge`). One-learner jobs and
audience-filtered jobs clear everything in their learner batch and have no purge.

Between chunks a purge batch is ``pending`` again with its cursor moved, so the next chunk is
whichever unit is next in turn. A message naming a cursor the batch has moved past is a
duplicate and does nothing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, func, select, update
from sqlalchemy.orm import Session

from models.batches import dead_learner_ranges, key_range, rows_to_purge
from models.components import RESET_COMPONENTS
from models.dialect import in_ids
from models.jobs import utcnow
from models.logs import log_event
from models.schema import ResetJob
from models.states import BatchKind, BatchState
from tasks.base import DATABASE_UNAVAILABLE
from tasks.reset_steps.batch import RUNNABLE_BATCH_STATES, count_purge_finished
from tasks.reset_steps.rows import Outcome, assignments, batches, job_uuid, jobs, lock_batch, running_job_or_cancel

STUCK_PREFIX = "could not delete"


@dataclass
class PurgeResult:
    status: str  # Outcome: progressed | done | skipped | cancelled
    deleted: int = 0
    cursor: int | None = None
    job_complete: bool = False


def _component(name: str):
    for component in RESET_COMPONENTS:
        if component.name == name:
            return component
    raise KeyError(f"unknown reset component {name!r}")


def purge_step(
    session: Session, job_id: str | uuid.UUID, batch_no: int, cursor: int | None, chunk_rows: int,
    lease_seconds: int, now: datetime | None = None,
) -> PurgeResult:
    """Clear the next ``chunk_rows`` pre-job rows of one component, in id order, in the caller's transaction.

    The batch row keeps the cursor. ``cursor`` is the one a ``resets.purge`` message carries
    (None from a ``resets.work`` claim): a message whose cursor the batch has moved past is a
    duplicate, or one already processed, and is refused. ``lease_seconds`` is not used (the
    signature is kept for its callers): the chunk holds the batch row's lock for its transaction.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    row = lock_batch(session, key, batch_no)
    if row is None or row.kind != BatchKind.PURGE or row.state not in RUNNABLE_BATCH_STATES:
        return PurgeResult(Outcome.SKIPPED)
    if cursor is not None and row.cursor_row_id != cursor:
        return PurgeResult(Outcome.SKIPPED)
    job = running_job_or_cancel(session, row, now)
    if job is None:
        return PurgeResult(Outcome.CANCELLED)
    t = _component(row.component).table
    chunk = (select(t.c.id).where(key_range(t.c.course_id, t.c.id, job.course_id, row.cursor_row_id, row.hi_row_id))
             .order_by(t.c.id).limit(chunk_rows).subquery())
    boundary = session.scalar(select(func.max(chunk.c.id)))
    deleted = 0
    if boundary is not None:
        where = rows_to_purge(job.course_id, row.cursor_row_id, boundary, dead_learner_ranges(session, key), table=t)
        if row.attempts:
            # This chunk failed before: delete it in halving sets inside savepoints, so one
            # row that cannot be deleted holds back only itself, and name it.
            deleted, stuck = _delete_around_failures(session, t, where)
            if stuck:
                ids = ", ".join(str(i) for i, _ in stuck[:20]) + (" ..." if len(stuck) > 20 else "")
                row.error = (f"{STUCK_PREFIX} {len(stuck)} {row.component} row(s) (ids {ids}): {stuck[0][1]}"
                             if not (row.error or "").startswith(STUCK_PREFIX) else row.error)
        else:
            deleted = session.execute(t.delete().where(where)).rowcount or 0
        row.cursor_row_id = int(boundary)
        row.cleared = {row.component: int((row.cleared or {}).get(row.component, 0)) + deleted}
    row.attempts = 0
    stuck_rows = (row.error or "").startswith(STUCK_PREFIX)
    if not stuck_rows:
        row.error = None
    if boundary is None or boundary >= row.hi_row_id:
        row.state = BatchState.DEAD if stuck_rows else BatchState.DONE
        row.finished_at = now
        row.lease_expires_at = None
        session.flush()
        return PurgeResult(Outcome.DONE, deleted, row.cursor_row_id,
                           job_complete=count_purge_finished(session, key, now, dead=stuck_rows))
    # Between chunks the batch is pending again: the next chunk is whichever unit is next in turn.
    row.state = BatchState.PENDING
    row.lease_expires_at = None
    session.flush()
    session.execute(update(jobs).where(jobs.c.id == key).values(heartbeat_at=now))
    return PurgeResult(Outcome.PROGRESSED, deleted, row.cursor_row_id)


def _delete_around_failures(session: Session, t, where) -> tuple[int, list[tuple[int, str]]]:
    """Delete the matching rows in halving sets, each in a savepoint; return (deleted, [(id, error)])."""
    ids = list(session.scalars(select(t.c.id).where(where).order_by(t.c.id)))
    deleted = 0
    stuck: list[tuple[int, str]] = []
    pending = [ids] if ids else []
    while pending:
        part = pending.pop()
        try:
            with session.begin_nested():
                deleted += session.execute(t.delete().where(in_ids(session, t.c.id, part, BigInteger))).rowcount or 0
        except DATABASE_UNAVAILABLE:
            raise  # connection or transaction lost: retry the step, do not blame rows
        except Exception as exc:  # the database refused this set: narrow it down
            if len(part) == 1:
                stuck.append((part[0], f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
            else:
                middle = len(part) // 2
                pending.extend([part[middle:], part[:middle]])
    return deleted, sorted(stuck)


@dataclass(frozen=True)
class PurgeFailure:
    dead: bool  # dead-lettered by this failure
    job_complete: bool  # and it was the job's last unfinished batch
    attempts: int  # failures in a row so far (0: the batch had already finished)


def fail_purge_step(
    session: Session, job_id: str | uuid.UUID, batch_no: int, error: str, max_attempts: int,
    now: datetime | None = None,
) -> PurgeFailure:
    """Count a failed purge step; dead-letter the batch after ``max_attempts`` failures in a row."""
    now = now or utcnow()
    key = job_uuid(job_id)
    mine = (batches.c.job_id == key) & (batches.c.batch_no == batch_no)
    attempts = session.scalar(
        update(batches).where(mine, batches.c.state.in_(RUNNABLE_BATCH_STATES))
        .values(attempts=batches.c.attempts + 1, error=error[:2000])
        .returning(batches.c.attempts)
    )
    if attempts is None or attempts < max_attempts:
        return PurgeFailure(False, False, attempts or 0)
    session.execute(update(batches).where(mine).values(
        state=BatchState.DEAD, error=f"dead-lettered after {attempts} attempts: {error[:1900]}", finished_at=now))
    log_event("reset.batch.dead", logging.ERROR, job_id=str(key), batch=batch_no, attempts=attempts,
              kind=BatchKind.PURGE)
    return PurgeFailure(True, count_purge_finished(session, key, now, dead=True), attempts)


def purge_reset_learners(session: Session, job: ResetJob) -> dict[str, int]:
    """Clear the pre-job rows of the learners this job did reset (a cancelled job's clean-up).

    Restricted by a join on ``last_reset_job_id``: learners the job never
    reached keep everything. Safe to run twice.
    """
    a = assignments.c
    reset_by_job = select(a.user_id).where(a.course_id == job.course_id, a.last_reset_job_id == job.id)
    cleared: dict[str, int] = {}
    for component in RESET_COMPONENTS:
        if component.name not in (job.watermarks or {}):
            continue
        t = component.table
        cleared[component.name] = session.execute(t.delete().where(
            t.c.course_id == job.course_id, t.c.id <= job.watermarks[component.name],
            t.c.user_id.in_(reset_by_job),
        )).rowcount or 0
    return cleared
