"""What a cancel does, once the producer has asked for it (``producer.resets.cancel``).

A queued job ends ``cancelled`` at once, on the producer side. A running one reads
``cancelling``, and then:

1. a unit that starts finds the job no longer running and marks its batch cancelled
   (:func:`running_job_or_cancel`); a unit already running finishes and counts;
2. ``resets.finalize`` (published by the cancel, and by the unit that noticed) waits until no
   learner batch is in flight, then :func:`finalize_cancelled` clears the earlier rows of the
   learners the job did reset that the purge had not reached, makes the analytics exact, ends
   the job ``cancelled`` and records the audit event with the true number of learners reset;
3. if that finalize was lost, the maintenance sweep publishes it again
   (:func:`republish_cancel_finalizes`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models import analytics
from models.components import RESET_COMPONENTS
from models.logs import log_event
from models.messaging import publish_after_commit
from models.schema import ResetBatch, ResetJob
from models.settings import Settings
from models.states import BatchKind, BatchState, JobState
from tasks.resets.progress import close_job, job_totals
from tasks.resets.tables import assignments, batches, jobs
from tasks.resets.wakeups import FINALIZE_TASK


def running_job_or_cancel(session: Session, batch: ResetBatch, now: datetime) -> ResetJob | None:
    """The batch's job if it is still running; otherwise mark the batch cancelled and return None."""
    job = session.get(ResetJob, batch.job_id, populate_existing=True)
    if job.state == JobState.RUNNING:
        return job
    batch.state = BatchState.CANCELLED
    batch.finished_at = now
    session.flush()
    return None


def purge_reset_learners(session: Session, job: ResetJob) -> dict[str, int]:
    """Clear the earlier rows of the learners this job did reset (the purge may not have reached them).

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


def finalize_cancelled(session: Session, job: ResetJob, now: datetime) -> bool:
    """Once no batch is in flight: clear what the purge did not reach for reset learners, exact
    analytics, state ``cancelled``, and the audit event with the true number of learners reset.
    Returns True when the job was closed.

    A learner batch still ``running`` under a live lease is in flight (its own transaction holds
    its row, or it is about to start and will find the job cancelling): wait for it. One whose
    lease ran out lost its worker; its work rolled back with it, so it is cancelled here.
    """
    in_flight = session.scalar(select(func.count()).select_from(batches).where(
        batches.c.job_id == job.id, batches.c.state == BatchState.RUNNING, batches.c.kind == BatchKind.LEARNERS,
        or_(batches.c.lease_expires_at.is_(None), batches.c.lease_expires_at >= now)))
    if in_flight:
        return False
    session.execute(update(batches).where(batches.c.job_id == job.id, batches.c.state.in_(
        (BatchState.WAITING, BatchState.PENDING, BatchState.RUNNING))).values(
        state=BatchState.CANCELLED, finished_at=now, lease_expires_at=None))
    extra = purge_reset_learners(session, job)
    analytics.recompute_course_analytics(session, job.course_id)
    cleared, learners_done, _dead = job_totals(session, job.id)
    for name, count in extra.items():
        cleared[name] = cleared.get(name, 0) + count
    close_job(session, job, JobState.CANCELLED, now, cleared, learners_done, actor_id=job.cancelled_by or job.actor_id)
    log_event("reset.job.cancelled", job_id=str(job.id), learners=learners_done, cleared=cleared)
    return True


def republish_cancel_finalizes(session: Session, now: datetime, settings: Settings) -> int:
    """The maintenance sweep's part: a cancelling job whose clean-up did not run (finalize lost,
    or waiting for a batch whose worker died: its lease runs out) gets its finalize again."""
    stale = now - timedelta(seconds=settings.publish_stale_seconds)
    ids = session.scalars(
        update(jobs)
        .where(jobs.c.state == JobState.CANCELLING, jobs.c.finalized_at.is_(None),
               or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale))
        .values(heartbeat_at=now)
        .returning(jobs.c.id)
    ).all()
    for job_id in ids:
        publish_after_commit(session, FINALIZE_TASK, [str(job_id)])
    return len(ids)
