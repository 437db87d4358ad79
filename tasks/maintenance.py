"""The maintenance sweep (beat, queue ``maintenance``): nothing committed is ever left behind.

Every tick it expires unconfirmed requests, re-publishes queued jobs that never started and
what running jobs that stopped making progress still need (:mod:`tasks.resets.stalled`),
publishes a lost cancel clean-up (:mod:`tasks.resets.cancelling`), and lets the notification
and webhook outboxes do the same for their rows. Duplicated messages are harmless: every task
is idempotent. Safe to run from two beats at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from models.db import session_scope
from models.jobs import expire_requests
from models.logs import log_event
from models.settings import Settings, get_settings
from models.times import utcnow
from tasks.base import project_task
from tasks.notifications.outbox import sweep_notifications
from tasks.notifications.sending import claim_lease_seconds
from tasks.resets.cancelling import republish_cancel_finalizes
from tasks.resets.stalled import republish_queued_jobs, resume_stalled_jobs
from tasks.webhooks.sweep import sweep_webhooks


@dataclass
class SweepReport:
    expired: int = 0
    jobs_republished: list[str] = field(default_factory=list)
    batches_republished: int = 0
    finalizes_published: int = 0
    notifications_requeued: int = 0

    def as_dict(self) -> dict:
        return self.__dict__ | {"jobs_republished": len(self.jobs_republished)}

    def did_something(self) -> bool:
        return any((self.expired, self.jobs_republished, self.batches_republished, self.finalizes_published,
                    self.notifications_requeued))


def sweep(session: Session, now: datetime | None = None, settings: Settings | None = None) -> SweepReport:
    """One maintenance pass in the caller's transaction; publishes after commit."""
    now = now or utcnow()
    settings = settings or get_settings()
    report = SweepReport()
    report.expired = expire_requests(session, now)
    report.jobs_republished = republish_queued_jobs(session, now, settings)
    report.batches_republished, report.finalizes_published = resume_stalled_jobs(session, now, settings)
    report.finalizes_published += republish_cancel_finalizes(session, now, settings)
    report.notifications_requeued = sweep_notifications(session, claim_lease_seconds(settings), now, settings)
    sweep_webhooks(session, now, settings)  # job events whose task message was lost
    return report


@project_task("maintenance.sweep", autoretry_for=())  # beat runs it again at the next tick
def run_sweep() -> None:
    """One sweep in its own transaction; logs what it re-published."""
    with session_scope() as session:
        report = sweep(session)
    if report.did_something():
        log_event("maintenance.sweep", **report.as_dict())
