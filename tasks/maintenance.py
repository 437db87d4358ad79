"""The maintenance sweep (beat, queue ``maintenance``): nothing committed is ever left behind.

Every tick it expires unconfirmed requests, re-publishes queued jobs that never
started (broker down at confirm time, message lost), re-publishes the
unfinished batches of running jobs that stopped making progress (worker killed,
Redis restarted with its data wiped), publishes a lost finalize (of a finished
or a cancelling job), and lets the notifications and webhooks sweeps do the same
for their outboxes. Duplicated messages are harmless: every task is
idempotent. Safe to run from two beats at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from models.db import session_scope
from models.jobs import utcnow
from models.logs import log_event
from models.messaging import publish_after_commit
from models.schema import ResetBatch, ResetJob
from models.settings import Settings, get_settings
from models.states import FINISHED_BATCH_STATES, BatchKind, BatchState, JobState
from tasks.base import project_task
from tasks.notifications import sweep_notifications
from tasks.resets import batch_task_name
from tasks.webhooks import sweep_webhooks

jobs = ResetJob.__table__
batches = ResetBatch.__table__


@dataclass
class SweepReport:
    expired: int = 0
    jobs_republished: list[str] = field(default_factory=list)
    batches_republished: int = 0
    finalizes_published: int = 0
    notifications_requeued: int = 0

    def as_dict(self) -> dict:
        return self.__dict__ | {"jobs_republished": len(self.jobs_republished)}


def expire_requests(session: Session, now: datetime) -> int:
    """Unconfirmed requests past their token's lifetime become ``expired`` (they never blocked anything)."""
    return session.execute(
        update(jobs).where(jobs.c.state == JobState.AWAITING_CONFIRMATION, jobs.c.token_expires_at < now)
        .values(state=JobState.EXPIRED, token_hash=None)
    ).rowcount or 0


def republish_queued_jobs(session: Session, now: datetime, settings: Settings) -> list[str]:
    stale = now - timedelta(seconds=settings.publish_stale_seconds)
    ids = session.scalars(
        update(jobs)
        .where(jobs.c.state == JobState.QUEUED, or_(jobs.c.published_at.is_(None), jobs.c.published_at < stale))
        .values(published_at=now)
        .returning(jobs.c.id)
    ).all()
    for job_id in ids:
        publish_after_commit(session, "resets.start", [str(job_id)])
    return [str(i) for i in ids]


def resume_stalled_jobs(session: Session, now: datetime, settings: Settings) -> tuple[int, int]:
    """Re-publish what a running job without recent progress still needs; returns (batches, finalizes)."""
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
        rows = session.execute(
            update(batches)
            .where(
                batches.c.job_id == job_id,
                or_(
                    and_(batches.c.state == BatchState.PENDING,
                         or_(batches.c.published_at.is_(None), batches.c.published_at < publish_stale)),
                    and_(batches.c.state == BatchState.RUNNING, batches.c.lease_expires_at < now,
                         or_(batches.c.published_at.is_(None), batches.c.published_at < publish_stale)),
                ),
            )
            .values(published_at=now)
            .returning(batches.c.batch_no, batches.c.kind, batches.c.cursor_row_id)
        ).all()
        for batch_no, kind, cursor in rows:
            if kind == BatchKind.PURGE:
                publish_after_commit(session, "resets.purge", [str(job_id), batch_no, cursor])
            else:
                publish_after_commit(session, batch_task_name(scope), [str(job_id), batch_no])
        republished += len(rows)
        unfinished = session.scalar(
            select(func.count()).select_from(batches)
            .where(batches.c.job_id == job_id, batches.c.state.not_in(FINISHED_BATCH_STATES))
        )
        if not unfinished:
            publish_after_commit(session, "resets.finalize", [str(job_id)])
            finalizes += 1
        if rows or not unfinished:
            log_event("maintenance.job.resumed", job_id=str(job_id), batches=len(rows), finalize=not unfinished)
    return republished, finalizes


def finish_cancelled_jobs(session: Session, now: datetime, settings: Settings) -> int:
    """A cancelling job whose clean-up did not run (finalize lost, or waiting for a batch whose
    worker died: its lease runs out) gets its finalize again."""
    stale = now - timedelta(seconds=settings.publish_stale_seconds)
    ids = session.scalars(
        update(jobs)
        .where(jobs.c.state == JobState.CANCELLING, jobs.c.finalized_at.is_(None),
               or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale))
        .values(heartbeat_at=now)
        .returning(jobs.c.id)
    ).all()
    for job_id in ids:
        publish_after_commit(session, "resets.finalize", [str(job_id)])
    return len(ids)


def sweep(session: Session, now: datetime | None = None, settings: Settings | None = None) -> SweepReport:
    """One maintenance pass in the caller's transaction; publishes after commit."""
    now = now or utcnow()
    settings = settings or get_settings()
    report = SweepReport()
    report.expired = expire_requests(session, now)
    report.jobs_republished = republish_queued_jobs(session, now, settings)
    report.batches_republished, report.finalizes_published = resume_stalled_jobs(session, now, settings)
    report.finalizes_published += finish_cancelled_jobs(session, now, settings)
    report.notifications_requeued = sweep_notifications(session, now)
    sweep_webhooks(session, now, settings)  # job events whose task message was lost
    return report


@project_task("maintenance.sweep", autoretry_for=())  # beat runs it again at the next tick
def run_sweep() -> None:
    with session_scope() as session:
        report = sweep(session)
    if any((report.expired, report.jobs_republished, report.batches_republished, report.finalizes_published,
            report.notifications_requeued)):
        log_event("maintenance.sweep", **report.as_dict())
