"""A learner batch: claim it (counting the attempt), reset its learners in one transaction.

A batch locks its row (a concurrent duplicate waits, then finds it ``done``) and the targeted
assignments (the lock learner activity takes first, R10), clears their rows, restarts their
attempt, writes the notification outbox rows, applies analytics deltas, marks itself ``done``
and counts itself on the job (:mod:`tasks.resets.progress`), all in one transaction. The
attempt is counted in an earlier commit (:func:`claim_batch`), so a batch that keeps failing,
even by killing its worker, is dead-lettered instead of looping.

:func:`run_learner_batch` runs one batch in its own transactions and publishes what follows it
(its notifications, the released purge, the finalize).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Integer, bindparam, func, literal_column, select, update
from sqlalchemy.orm import Session

from models import analytics
from models.batches import key_range, learners_not_reset
from models.components import RESET_COMPONENTS
from models.db import session_scope
from models.dialect import in_ids, insert, is_postgres
from models.job_ids import job_uuid
from models.jobs import target_filter
from models.logs import log_event
from models.messaging import publish_after_commit
from models.schema import Notification, ResetBatch, ResetJob, User
from models.settings import get_settings
from models.states import RUNNABLE_BATCH_STATES, AssignmentStatus, BatchKind, BatchState, JobState, NotificationStatus
from models.times import as_utc, utcnow
from tasks.base import DATABASE_UNAVAILABLE
from tasks.resets.cancelling import running_job_or_cancel
from tasks.resets.failures import BatchFailed, error_text, record_batch_error
from tasks.resets.finalize import finalize_or_publish
from tasks.resets.outcome import Outcome
from tasks.resets.progress import count_learner_batch, count_purge_finished
from tasks.resets.tables import assignments, batches, jobs, lock_batch
from tasks.resets.wakeups import publish_follow_ups

NOTIFY_TASK = "notifications.send"


# --- claim -----------------------------------------------------------------------------------

@dataclass
class ClaimResult:
    runnable: bool
    attempts: int = 0
    dead: bool = False
    job_complete: bool = False
    purge: list[tuple[int, int]] = field(default_factory=list)


def claim_batch(
    session: Session, job_id: str | uuid.UUID, batch_no: int, max_attempts: int, lease_seconds: int,
    now: datetime | None = None, owner: str | None = None,
) -> ClaimResult:
    """Count an attempt at the batch and take its lease; commit this before doing the work.

    A finished batch is not runnable. A batch that has used up its attempts is
    dead-lettered (state ``dead`` with its last error) and counted on the job.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    mine = (batches.c.job_id == key) & (batches.c.batch_no == batch_no)
    row = session.execute(
        update(batches).where(mine, batches.c.state.in_(RUNNABLE_BATCH_STATES))
        .values(attempts=batches.c.attempts + 1, state=BatchState.RUNNING, claimed_at=now, claimed_by=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(batches.c.attempts, batches.c.error, batches.c.kind)
    ).first()
    if row is None:
        return ClaimResult(False)
    attempts, last_error, kind = row
    if attempts <= max_attempts:
        return ClaimResult(True, attempts)
    reason = f"dead-lettered after {attempts - 1} attempts: {last_error or 'unknown error'}"
    session.execute(update(batches).where(mine).values(state=BatchState.DEAD, error=reason, finished_at=now,
                                                       lease_expires_at=None))
    log_event("reset.batch.dead", logging.ERROR, job_id=str(key), batch=batch_no, attempts=attempts - 1, kind=kind)
    if kind == BatchKind.PURGE:
        return ClaimResult(False, attempts, dead=True, job_complete=count_purge_finished(session, key, now, dead=True))
    phase = count_learner_batch(session, key, now, learners=0, dead=True)
    return ClaimResult(False, attempts, dead=True, job_complete=phase.job_complete, purge=phase.purge)


# --- run -------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    status: str  # Outcome: done | skipped | cancelled
    learners: int = 0
    notifications: int = 0
    cleared: dict[str, int] = field(default_factory=dict)
    job_complete: bool = False
    purge: list[tuple[int, int]] = field(default_factory=list)
    job_state: str = JobState.RUNNING


NOTIFICATION_COLUMNS = ["user_id", "course_id", "reset_job_id", "kind", "status", "attempts", "created_at"]


def _notifications(session: Session, job: ResetJob, now: datetime, learner_filter):
    """``INSERT`` of the outbox rows of the reset learners whose setting allows it, read now (R9).

    A row already written for the learner by this job is kept (a duplicate batch writes none).
    """
    u = User.__table__.c
    source = select(
        u.id, bindparam("course_id", job.course_id, type_=Integer), bindparam("job", job.id, type_=jobs.c.id.type),
        bindparam("kind", "course_assigned"), bindparam("status", NotificationStatus.PENDING),
        bindparam("attempts", 0, Integer), bindparam("created_at", now, type_=Notification.__table__.c.created_at.type),
    ).where(learner_filter, u.notify_course_assigned)
    return (insert(session, Notification.__table__).from_select(NOTIFICATION_COLUMNS, source)
            .on_conflict_do_nothing().returning(Notification.__table__.c.id))


def _batch_targets(job: ResetJob, batch: ResetBatch):
    """The batch's learners still to reset: targeted (R6, audience), in range, not yet reset by this job."""
    a = assignments.c
    return select(a.user_id, a.status).where(
        target_filter(job.course_id, job.learner_id, as_utc(job.completed_before)),
        learners_not_reset(job.id, job.course_id, batch.lo_user_id, batch.hi_user_id),
    )


def _restart_values(job: ResetJob) -> dict:
    """A new attempt: nothing done, not started, and the job that reset it (R4, idempotency)."""
    a = assignments.c
    return dict(status=AssignmentStatus.NOT_STARTED, progress_pct=0.0, items_done=0, score=None, started_at=None,
                completed_at=None, attempt=a.attempt + 1, last_reset_job_id=job.id)


def _components_to_clear(session: Session, job: ResetJob) -> list[tuple]:
    """(component, extra condition) for each component the batch must clear rows of.

    With watermarks (deferred purge) only rows newer than the job's start are
    cleared by the batch, and usually there are none: the course's highest row
    id (one backward probe of the (course_id, id) index) says so.
    """
    watermarks = job.watermarks or {}
    todo = []
    for component in RESET_COMPONENTS:
        t = component.table
        if component.name not in watermarks:
            todo.append((component, None))
            continue
        latest = session.scalar(select(func.max(t.c.id)).where(t.c.course_id == job.course_id))
        if latest is not None and latest > watermarks[component.name]:
            todo.append((component, t.c.id > watermarks[component.name]))
    return todo


@dataclass
class _Cleared:
    learners: int
    in_progress: int
    completed: int
    cleared: dict[str, int]
    notified: int


def _no_targets() -> _Cleared:
    return _Cleared(0, 0, 0, {c.name: 0 for c in RESET_COMPONENTS}, 0)


def _reset_in_one_statement(session: Session, job: ResetJob, batch: ResetBatch, now: datetime) -> _Cleared:
    """PostgreSQL: lock the batch's learners, then clear, restart and write the outbox in one statement.

    The lock comes first, in its own statement: the second statement's
    snapshot then sees all activity committed before the locks were granted,
    and it touches exactly the learners locked (R10). Every part of the second
    statement joins ``targets`` on the primary key.
    """
    a = assignments.c
    ids = session.scalar(select(func.array_agg(literal_column("locked.user_id"))).select_from(
        _batch_targets(job, batch).order_by(a.user_id).with_for_update().subquery("locked")))
    if not ids:
        return _no_targets()
    # The id range keeps every part on the primary key (course_id, user_id) within the batch.
    in_range = key_range(a.course_id, a.user_id, job.course_id, min(ids) - 1, max(ids))
    targets = select(a.user_id, a.status).where(in_range, in_ids(session, a.user_id, ids)).cte("targets")
    target_ids = select(targets.c.user_id)
    watermarks = job.watermarks or {}
    deletes = {}
    for component in RESET_COMPONENTS:
        t = component.table
        where = [t.c.course_id == job.course_id, t.c.user_id.in_(target_ids)]
        if component.name in watermarks:
            # Only rows newer than the job's start (usually none: an index range on (course_id, id)).
            where.append(t.c.id > watermarks[component.name])
        deletes[component.name] = t.delete().where(*where).returning(t.c.id).cte(f"clear_{component.name}")
    restarted = (update(assignments).where(in_range, a.user_id == targets.c.user_id)
                 .values(**_restart_values(job)).returning(a.user_id).cte("restarted"))
    notified = _notifications(session, job, now, User.__table__.c.id.in_(target_ids)).cte("notified")

    def count(cte, *where):
        return select(func.count()).select_from(cte).where(*where).scalar_subquery()

    row = session.execute(select(
        count(restarted), count(targets, targets.c.status == AssignmentStatus.IN_PROGRESS),
        count(targets, targets.c.status == AssignmentStatus.COMPLETED), count(notified), *(count(c) for c in deletes.values()),
    )).one()
    cleared = dict(zip(deletes, (int(v) for v in row[4:])))
    return _Cleared(int(row[0]), int(row[1]), int(row[2]), cleared, int(row[3]))


def _reset_statement_by_statement(session: Session, job: ResetJob, batch: ResetBatch, now: datetime) -> _Cleared:
    """SQLite (the embedded default): the same rules, one statement per part over the batch's ids.

    (SQLite has no row locks: ``BEGIN IMMEDIATE`` already serialises writers.)
    """
    targets = session.execute(_batch_targets(job, batch).order_by(assignments.c.user_id)).all()
    ids = [row.user_id for row in targets]
    if not ids:
        return _no_targets()
    cleared = {c.name: 0 for c in RESET_COMPONENTS}
    for component, extra in _components_to_clear(session, job):
        t = component.table
        where = [t.c.course_id == job.course_id, in_ids(session, t.c.user_id, ids)]
        if extra is not None:
            where.append(extra)
        cleared[component.name] = session.execute(t.delete().where(*where)).rowcount or 0
    a = assignments.c
    session.execute(update(assignments).where(a.course_id == job.course_id, in_ids(session, a.user_id, ids))
                    .values(**_restart_values(job)))
    notified = len(session.execute(_notifications(session, job, now, in_ids(session, User.__table__.c.id, ids))).all())
    statuses = [row.status for row in targets]
    return _Cleared(len(ids), statuses.count(AssignmentStatus.IN_PROGRESS), statuses.count(AssignmentStatus.COMPLETED), cleared, notified)


def reset_batch(session: Session, job_id: str | uuid.UUID, batch_no: int, now: datetime | None = None) -> BatchResult:
    """Reset the learners of one batch in the caller's transaction.

    Locks the batch row (a concurrent duplicate waits, then finds it done),
    locks the targeted assignments (serialising with learner activity, R10),
    clears every registered component (R4), restarts their attempt, writes
    notification rows (R9), applies analytics deltas, marks the batch done and
    counts it on the job. Safe to run twice.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    batch = lock_batch(session, key, batch_no)
    if batch is None or batch.state != BatchState.RUNNING or batch.kind != BatchKind.LEARNERS:
        return BatchResult(Outcome.SKIPPED)
    job = running_job_or_cancel(session, batch, now)
    if job is None:
        # Cancelled meanwhile: hand on to the clean-up instead of waiting for the sweep.
        return BatchResult(Outcome.CANCELLED, job_state=JobState.CANCELLING)
    # PostgreSQL does the batch in one data-modifying statement after locking the learners;
    # SQLite has neither row locks nor data-modifying CTEs, so it goes statement by statement.
    reset = (_reset_in_one_statement if is_postgres(session) else _reset_statement_by_statement)(
        session, job, batch, now)
    if reset.learners:
        analytics.apply_delta(session, job.course_id, not_started=reset.learners, in_progress=-reset.in_progress,
                              completed=-reset.completed)
    batch.state = BatchState.DONE
    batch.learners_reset = reset.learners
    batch.cleared = reset.cleared
    batch.finished_at = now
    batch.lease_expires_at = None
    session.flush()
    phase = count_learner_batch(session, key, now, learners=reset.learners)
    return BatchResult(Outcome.DONE, reset.learners, reset.notified, reset.cleared, job_complete=phase.job_complete,
                       purge=phase.purge, job_state=phase.job_state)


# --- run one batch in its own transactions --------------------------------------------------------

def run_learner_batch(job_id: str, batch_no: int, claim: ClaimResult | None = None,
                      finalize_inline: bool = False) -> BatchResult | None:
    """Claim (unless ``claim`` was committed already), reset and commit one batch; publish its
    notifications and the released purge after commit, and the finalize (or, with
    ``finalize_inline``, finalize here).

    An error in the batch's transaction raises :class:`BatchFailed`: the attempt stays counted and
    the error is recorded, and the caller backs the unit off. Returns None when the batch is not
    runnable.
    """
    settings = get_settings()
    if claim is None:
        with session_scope() as session:
            claim = claim_batch(session, job_id, batch_no, settings.batch_max_attempts, settings.batch_lease_seconds)
            if claim.dead:
                publish_follow_ups(session, job_id, claim.job_complete, len(claim.purge))
    if not claim.runnable:
        return None
    started = time.perf_counter()
    try:
        with session_scope() as session:
            result = reset_batch(session, job_id, batch_no)
            if result.notifications:
                publish_after_commit(session, NOTIFY_TASK, [job_id])
            finalize = result.job_complete or result.job_state == JobState.CANCELLING
            publish_follow_ups(session, job_id, finalize and not finalize_inline, len(result.purge))
    except Exception as exc:
        error = error_text(exc)
        log_event("reset.batch.error", logging.WARNING, job_id=job_id, batch=batch_no, attempt=claim.attempts,
                  error=error)
        try:
            with session_scope() as session:
                record_batch_error(session, job_id, batch_no, error)
        except DATABASE_UNAVAILABLE:
            pass  # the database is gone: the attempt stays counted, only its reason is not kept
        raise BatchFailed(claim.attempts) from exc
    log_event("reset.batch.done", job_id=job_id, batch=batch_no, status=result.status, learners=result.learners,
              duration_ms=round((time.perf_counter() - started) * 1000, 1))
    if finalize and finalize_inline:
        finalize_or_publish(job_id)
    return result
