"""The maintenance sweep's part of job events: deliveries whose message was lost get one again."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from models.job_events import DELIVER_TASK
from models.logs import log_event
from models.messaging import publish_after_commit
from models.settings import Settings, get_settings
from models.states import OPEN_DELIVERY_STATES, DeliveryStatus
from models.times import utcnow
from tasks.webhooks.deliveries import d


def sweep_webhooks(session: Session, now: datetime | None = None, settings: Settings | None = None) -> int:
    """Re-publish ``webhooks.deliver`` for every endpoint with a delivery due and not recently published.

    Covers a publish lost between commit and broker, a retry due later than a
    countdown covers, and a lease left by a killed worker. Safe to run from
    two sweeps at once (duplicated tasks claim disjoint rows). Returns the
    number of endpoints published. Publishes after the caller's commit.
    """
    now = now or utcnow()
    settings = settings or get_settings()
    stale = now - timedelta(seconds=settings.publish_stale_seconds)
    rows = session.execute(
        update(d).where(
            d.c.status.in_(OPEN_DELIVERY_STATES),
            or_(and_(d.c.status == DeliveryStatus.PENDING, d.c.next_attempt_at <= now),
                and_(d.c.status == DeliveryStatus.SENDING, d.c.lease_expires_at < now)),
            or_(d.c.published_at.is_(None), d.c.published_at < stale),
        ).values(published_at=now).returning(d.c.endpoint_id)
    ).all()
    endpoints = sorted({r.endpoint_id for r in rows})
    for endpoint_id in endpoints:
        publish_after_commit(session, DELIVER_TASK, [endpoint_id])
    if endpoints:
        log_event("webhooks.sweep.republished", endpoints=len(endpoints), deliveries=len(rows))
    return len(endpoints)
