"""Jobs whose messages were lost: the maintenance sweep's part of the reset pipeline.

A confirmed job whose ``resets.start`` never arrived (broker down at confirm time, message lost)
is published again; a running job that stopped making progress (worker killed, Redis restarted
with its data wiped) gets wake-ups for the units it still has, or its finalize. Every message
published here is idempotent, so a duplicate of a message that was only slow changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from models.logs import log_event
from models.messaging import publish_after_commit
from models.settings import Settings
from models.states import FINISHED_BATCH_STATES, BatchState, JobScope, JobState
from tasks.resets.one_learner import RETRY_TASK
from tasks.resets.tables import batches, jobs
from tasks.resets.wakeups import FINALIZE_TASK, wake_workers

START_TASK = "resets.start"


def republish_queued_jobs(session: Session, now: datetime, settings: Settings) -> list[str]:
    """Publish ``resets.start`` again for queued jobs not started ``PUBLISH_STALE_SECONDS`` after their publish."""
    stale = now - timedelta(seconds=settings.publish_stale_seconds)
    ids = session.scalars(
        update(jobs)
        .where(jobs.c.state == JobState.QUEUED, or_(jobs.c.published_at.is_(None), jobs.c.published_at < stale))
        .values(published_at=now)
        .returning(jobs.c.id)
    ).all()
    for job_id in ids:
        publish_after_commit(session, START_TASK, [str(job_id)])
    return [str(i) for i in ids]


def resume_stalled_jobs(session: Session, now: datetime, settings: Settings) -> tuple[int, int]:
    """Re-publish what a running job without recent progress still needs; returns (units, finalizes).

    A course-wide job's runnable units get wake-ups (whichever unit is next in turn runs); a
    one-learner job's batch gets its ``resets.run_single`` retry; a job with nothing left
    unfinished gets its finalize.
    """
    stalled_before = now - timedelta(seconds=settings.job_stale_seconds)
    publish_stale = now - timedelta(seconds=settings.publish_stale_seconds)
    stalled = session.execute(
        select(jobs.c.id, jobs.c.scope)
        .where(jobs.c.state == JobState.RUNNING,
               or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stalled_before))
        .with_for_update(skip_locked=True)
    ).all()
    republished = finalizes = 0
    for job_id, scope in stalled:
        unpublished = or_(batches.c.published_at.is_(None), batches.c.published_at < publish_stale)
        rows = session.execute(
            update(batches)
            .where(batches.c.job_id == job_id,
                   or_(and_(batches.c.state == BatchState.PENDING, unpublished),
                       and_(batches.c.state == BatchState.RUNNING, batches.c.lease_expires_at < now, unpublished)))
            .values(published_at=now)
            .returning(batches.c.batch_no)
        ).scalars().all()
        if scope == JobScope.LEARNER:
            for batch_no in rows:
                publish_after_commit(session, RETRY_TASK, [str(job_id), batch_no])
        else:
            wake_workers(session, len(rows))
        republished += len(rows)
        unfinished = session.scalar(
            select(func.count()).select_from(batches)
            .where(batches.c.job_id == job_id, batches.c.state.not_in(FINISHED_BATCH_STATES))
        )
        if not unfinished:
            publish_after_commit(session, FINALIZE_TASK, [str(job_id)])
            finalizes += 1
        if rows or not unfinished:
            log_event("maintenance.job.resumed", job_id=str(job_id), batches=len(rows), finalize=not unfinished)
    return republished, finalizes
