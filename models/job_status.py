"""What a job is and how far it got, in the contract's shapes (docs/rules.md, "Contracts").

One definition for ``status`` (CLI and HTTP), the job listings and the data of webhook events.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.retention import pruned_notification_counts
from models.schema import Notification, ResetBatch, ResetJob
from models.states import BatchKind, BatchState, NotificationStatus
from models.times import iso
from models.tracing import trace_id_of


def job_identity(job: ResetJob) -> dict:
    """What a job is: its id, state, scope and the ids it concerns (the first keys of every job shape)."""
    return {"job_id": str(job.id), "state": job.state, "scope": job.scope, "course_id": job.course_id,
            "learner_id": job.learner_id, "campaign_id": job.campaign_id}


def describe_status(session: Session, job: ResetJob) -> dict:
    """The job's state and counts in the contract's status shape."""
    n = Notification.__table__.c
    counts = dict(session.execute(
        select(n.status, func.count()).where(n.reset_job_id == job.id).group_by(n.status)
    ).all())
    pruned = pruned_notification_counts(session, job.id)  # rows retention removed, still counted
    return job_identity(job) | {
        "learners_total": job.learners_total,
        "learners_done": job.learners_done,
        "batches_total": job.batches_total + job.purge_total,
        "batches_done": job.batches_done + job.purge_done - _dead_purges(session, job),
        "batches_dead": job.batches_dead,
        "learner_batches_total": job.batches_total,
        "purge_batches_total": job.purge_total,
        "purge_batches_done": job.purge_done,
        "cleared": dict(job.cleared or {}),
        "notifications": {
            "pending": int(counts.get(NotificationStatus.PENDING, 0) + counts.get(NotificationStatus.SENDING, 0)),
            "sent": int(counts.get(NotificationStatus.SENT, 0)) + pruned[NotificationStatus.SENT],
            "failed": int(counts.get(NotificationStatus.FAILED, 0)) + pruned[NotificationStatus.FAILED],
        },
        "created_at": iso(job.created_at),
        "confirmed_at": iso(job.confirmed_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": job.error,
        "trace_id": trace_id_of(job.traceparent),
    }


def _dead_purges(session: Session, job: ResetJob) -> int:
    if not job.batches_dead or not job.purge_total:
        return 0
    b = ResetBatch.__table__
    return session.scalar(select(func.count()).select_from(b).where(
        b.c.job_id == job.id, b.c.kind == BatchKind.PURGE, b.c.state == BatchState.DEAD)) or 0
