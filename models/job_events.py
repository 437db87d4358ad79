"""Job events for subscribing services: the webhook outbox rows, written with the state change.

:func:`record_job_event` is called by :func:`models.audit.record_audit`, so an event is written
in the very transaction of the state change it reports (confirm, cancel, a campaign's
occurrence, a job's finalize): if that transaction rolls back there is no event, and if it
commits the event is in the outbox. One ``webhook_deliveries`` row per subscribed endpoint of
the organization is the delivery's outbox row and its log. Sending is the ``webhooks.deliver``
task's business (:mod:`tasks.webhooks`); each new delivery publishes that task by name after the
commit (:mod:`models.messaging`).

Payloads hold ids and counts only: never cleared data, never names or e-mails.
Functions take a ``Session`` and never commit.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from models.job_status import describe_status
from models.messaging import publish_after_commit
from models.schema import ResetJob, WebhookDelivery, WebhookEndpoint, WebhookEvent
from models.states import DeliveryStatus

EVENT_TYPES = ("reset.confirmed", "reset.succeeded", "reset.failed", "reset.cancelled")

# Audit action -> event type. A campaign's occurrence confirms its job (the admin confirmed the
# campaign once); everything else in the audit trail is not a job event.
AUDIT_ACTION_EVENTS = {
    "reset.confirmed": "reset.confirmed",
    "campaign.occurrence_queued": "reset.confirmed",
    "reset.succeeded": "reset.succeeded",
    "reset.failed": "reset.failed",
    "reset.cancelled": "reset.cancelled",
}

DELIVER_TASK = "webhooks.deliver"


def job_event_payload(session: Session, event_id: uuid.UUID, event_type: str, job: ResetJob,
                      created_at: datetime, actor_id: int | None) -> dict:
    """The event body: the job's status at the moment of the change (the shape of ``GET /v1/resets/{id}``)
    plus who acted, why and from where. Ids and counts only, never personal data."""
    data = describe_status(session, job) | {
        "actor_id": actor_id if actor_id is not None else job.actor_id, "reason": job.reason, "origin": job.origin}
    return {"id": str(event_id), "type": event_type, "created_at": created_at.isoformat(),
            "organization_id": job.organization_id, "data": data}


def record_job_event(session: Session, action: str, organization_id: int, job_id: uuid.UUID | None,
                     actor_id: int | None, now: datetime) -> WebhookEvent | None:
    """Write the event an audit action stands for, and one delivery per subscribed endpoint.

    Nothing for actions that are not job events, or when no endpoint of the
    organization wants this event (no row is written then). Does not commit.
    """
    event_type = AUDIT_ACTION_EVENTS.get(action)
    if event_type is None or job_id is None:
        return None
    e = WebhookEndpoint.__table__.c
    endpoints = [row.id for row in session.execute(
        select(e.id, e.events).where(e.organization_id == organization_id, e.deleted_at.is_(None)).order_by(e.id))
        if event_type in (row.events or [])]
    if not endpoints:
        return None
    job = session.get(ResetJob, job_id)
    if job is None:  # pragma: no cover - every caller holds the job it audits
        return None
    event_id = uuid.uuid4()
    event = WebhookEvent(id=event_id, organization_id=organization_id, type=event_type, job_id=job.id,
                         payload=job_event_payload(session, event_id, event_type, job, now, actor_id),
                         created_at=now)
    session.add(event)
    session.flush([event])
    session.execute(insert(WebhookDelivery.__table__), [
        {"event_id": event_id, "endpoint_id": endpoint_id, "job_id": job.id, "status": DeliveryStatus.PENDING,
         "attempts": 0, "next_attempt_at": now, "published_at": now, "created_at": now}
        for endpoint_id in endpoints])
    for endpoint_id in endpoints:
        publish_after_commit(session, DELIVER_TASK, [endpoint_id])
    return event
