"""Writing the audit trail: the fact of each action, never the data it cleared (R5).

The trail is append-only in the database itself (migration 0005). Reading it out (pages and
exports) is the producer's (:mod:`producer.audit`).
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from models.job_events import record_job_event
from models.schema import AuditEvent
from models.times import utcnow


def record_audit(
    session: Session,
    action: str,
    organization_id: int,
    *,
    actor_id: int | None = None,
    course_id: int | None = None,
    learner_id: int | None = None,
    job_id: uuid.UUID | None = None,
    campaign_id: int | None = None,
    learner_count: int | None = None,
    reason: str = "",
    origin: str = "",
    details: dict | None = None,
) -> AuditEvent:
    """Record the fact of an action in the caller's transaction; never the data it cleared (R5).

    A job's state change (confirmed, succeeded, failed, cancelled) is also a job event for
    subscribing services: its webhook event and deliveries are written here, in the same
    transaction (:func:`models.job_events.record_job_event`), so an event exists exactly when
    the change committed.
    """
    now = utcnow()
    event = AuditEvent(
        organization_id=organization_id, actor_id=actor_id, action=action, course_id=course_id,
        learner_id=learner_id, job_id=job_id, campaign_id=campaign_id, learner_count=learner_count,
        reason=reason, origin=origin, details=details or {}, created_at=now,
    )
    session.add(event)
    record_job_event(session, action, organization_id, job_id, actor_id, now)
    return event
