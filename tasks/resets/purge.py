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
whichever unit is next in turn (:mod:`tasks.resets.turns`). :func:`run_purge_chunk` runs one
chunk in its own transaction; a chunk that raises is counted and backed off
(:mod:`tasks.resets.failures`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, func, select, update
from sqlalchemy.orm import Session

from models.batches import dead_learner_ranges, key_range, rows_to_purge
from models.components import RESET_COMPONENTS
from models.db import session_scope
from models.dialect import in_ids
from models.job_ids import job_uuid
from models.logs import log_event
from models.messaging import publish_after_commit
from models.settings import get_settings
from models.states import RUNNABLE_BATCH_STATES, BatchKind, BatchState
from models.times import utcnow
from tasks.base import DATABASE_UNAVAILABLE
from tasks.resets.cancelling import running_job_or_cancel
from tasks.resets.failures import defer_failed_unit, error_text
from tasks.resets.finalize import finalize_or_publish
from tasks.resets.outcome import Outcome
from tasks.resets.progress import count_purge_finished
from tasks.resets.tables import jobs, lock_batch
from tasks.resets.wakeups import FINALIZE_TASK

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
    session: Session, job_id: str | uuid.UUID, batch_no: int, chunk_rows: int, cursor: int | None = None,
    now: datetime | None = None,
) -> PurgeResult:
    """Clear the next ``chunk_rows`` pre-job rows of one component, in id order, in the caller's transaction.

    The batch row keeps the cursor and its lock is held for the chunk's transaction, so a
    concurrent duplicate waits and then continues from the moved cursor. With ``cursor``, a
    batch that has moved past it is not run (the caller's view of the batch is stale).
    Safe to run twice.
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
    # Between chunks the batch is pending again: the next chunk is whichever unit is next in turn
    # (runnable from now: the wake-up the unit hands on is published for it).
    row.state = BatchState.PENDING
    row.published_at = now
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


def run_purge_chunk(job_id: str, batch_no: int, finalize_inline: bool = False) -> str:
    """One purge chunk in its own transaction; on failure count it and back it off. Returns the step's outcome.

    The job's last chunk finalizes it here (``finalize_inline``) or publishes ``resets.finalize``.
    """
    settings = get_settings()
    started = time.perf_counter()
    try:
        with session_scope() as session:
            result = purge_step(session, job_id, batch_no, settings.purge_chunk_rows)
            finalize = ((result.status == Outcome.DONE and result.job_complete)
                        or result.status == Outcome.CANCELLED)
            if finalize and not finalize_inline:
                publish_after_commit(session, FINALIZE_TASK, [job_id])
    except Exception as exc:
        error = error_text(exc)
        log_event("reset.purge.error", logging.WARNING, job_id=job_id, batch=batch_no, error=error)
        defer_failed_unit(job_id, batch_no, purge_error=error)
        return Outcome.FAILED
    log_event("reset.purge.step", job_id=job_id, batch=batch_no, status=result.status, rows=result.deleted,
              duration_ms=round((time.perf_counter() - started) * 1000, 1))
    if finalize and finalize_inline:
        finalize_or_publish(job_id)
    return result.status
