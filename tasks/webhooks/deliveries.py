"""The delivery rows of job events: claiming the next one of an endpoint, and recording an attempt.

    pending --claim--> sending --2xx--> delivered
                          |--5xx, 408, 429, timeout, connection error--> pending (backoff + jitter,
                          |       or Retry-After) ... --> failed (WEBHOOKS_MAX_ATTEMPTS)
                          |--other 4xx, 3xx, URL no longer allowed--> failed
                          '--worker killed--> still sending; claimable again once its lease ends

A claim is a conditional UPDATE (status and attempts unchanged), so two runs never own one row,
and an outcome is recorded only for the claim that is still current. A delivery is claimable
only when no earlier delivery of the same job to the same endpoint is still open, so events of
one job arrive in order. Functions take a Session and never commit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from models.logs import log_event
from models.schema import WebhookDelivery, WebhookEndpoint, WebhookEvent
from models.settings import Settings, get_settings
from models.states import OPEN_DELIVERY_STATES, DeliveryStatus
from models.times import as_utc, utcnow
from tasks.backoff import backoff_seconds

# A claimed delivery is the claimer's for the attempt's total deadline plus this margin: the
# attempt has ended (answered, or cut off at its deadline) before anyone may claim the row again.
LEASE_MARGIN_SECONDS = 5.0
# Characters of the receiver's answer kept in the delivery log.
MAX_ERROR_TEXT = 300

d = WebhookDelivery.__table__
e = WebhookEndpoint.__table__
ev = WebhookEvent.__table__


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery_id: int
    endpoint_id: int
    attempt: int
    url: str
    secrets: list[str]
    event_id: uuid.UUID
    event_type: str
    payload: dict


@dataclass(frozen=True)
class AttemptOutcome:
    delivered: bool
    retryable: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


def lease_seconds(settings: Settings) -> float:
    """How long a claim owns its row: longer than the attempt can last (``WEBHOOKS_TIMEOUT_SECONDS``)."""
    return settings.webhooks_timeout_seconds + LEASE_MARGIN_SECONDS


def not_blocked():
    """No earlier delivery of the same job to the same endpoint is still open (per-job order)."""
    earlier = aliased(WebhookDelivery.__table__)
    return ~exists().where(earlier.c.endpoint_id == d.c.endpoint_id, earlier.c.job_id == d.c.job_id,
                           earlier.c.id < d.c.id, earlier.c.status.in_(OPEN_DELIVERY_STATES))


def _claimable(now: datetime):
    return and_(
        or_(and_(d.c.status == DeliveryStatus.PENDING, d.c.next_attempt_at <= now),
            and_(d.c.status == DeliveryStatus.SENDING, d.c.lease_expires_at < now)),
        not_blocked(),
    )


def claim_next_delivery(session: Session, endpoint_id: int, now: datetime | None = None,
                        settings: Settings | None = None) -> ClaimedDelivery | None:
    """Claim the endpoint's oldest due delivery whose job has no earlier one unfinished; None if none.

    The claim is a conditional UPDATE (status and attempts unchanged), so two
    runs never own one row; the row is ``sending`` under a lease that outlives the attempt. A row
    whose last allowed attempt lost its worker is not claimed again: it ends ``failed``, so
    ``attempts`` never passes ``WEBHOOKS_MAX_ATTEMPTS``.
    """
    now = now or utcnow()
    settings = settings or get_settings()
    endpoint = session.execute(select(e.c.url, e.c.secret, e.c.previous_secret, e.c.previous_secret_expires_at)
                               .where(e.c.id == endpoint_id, e.c.deleted_at.is_(None))).first()
    if endpoint is None:
        return None
    for _ in range(20):
        row = session.execute(
            select(d.c.id, d.c.status, d.c.attempts, d.c.event_id).where(d.c.endpoint_id == endpoint_id,
                                                                          _claimable(now))
            .order_by(d.c.id).limit(1).with_for_update(skip_locked=True, of=d)
        ).first()
        if row is None:
            return None
        if row.attempts >= settings.webhooks_max_attempts:
            session.execute(update(d).where(d.c.id == row.id, d.c.status == row.status, d.c.attempts == row.attempts)
                            .values(status=DeliveryStatus.FAILED, lease_expires_at=None,
                                    last_error=f"no answer recorded for attempt {row.attempts}, the last allowed "
                                               "(the worker sending it was lost)"))
            log_event("webhooks.delivery.failed", logging.WARNING, delivery_id=row.id, endpoint_id=endpoint_id,
                      event_id=str(row.event_id), attempt=row.attempts, status_code=None)
            continue
        claimed = session.execute(
            update(d).where(d.c.id == row.id, d.c.status == row.status, d.c.attempts == row.attempts)
            .values(status=DeliveryStatus.SENDING, attempts=row.attempts + 1, last_attempt_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_seconds(settings)))
        ).rowcount
        if claimed == 1:
            event = session.execute(select(ev.c.type, ev.c.payload).where(ev.c.id == row.event_id)).one()
            in_use = [endpoint.secret]
            if endpoint.previous_secret and as_utc(endpoint.previous_secret_expires_at) > now:
                in_use.append(endpoint.previous_secret)
            return ClaimedDelivery(row.id, endpoint_id, row.attempts + 1, endpoint.url, in_use, row.event_id,
                                   event.type, event.payload)
    return None  # pragma: no cover - twenty rows failed or lost in a row: the next run goes on


def retry_delay(attempt: int, settings: Settings) -> float:
    """Seconds before a delivery that failed on ``attempt`` is tried again (the project's one backoff)."""
    return backoff_seconds(attempt, settings.webhooks_retry_base_seconds, settings.webhooks_retry_max_seconds)


def record_outcome(session: Session, claimed: ClaimedDelivery, outcome: AttemptOutcome,
                   now: datetime | None = None,
                   settings: Settings | None = None) -> str:
    """Mark the claimed delivery ``delivered``, back to ``pending`` with its next attempt, or ``failed``.

    Only the claim that is still current is recorded (same attempt, still
    sending); a late answer after the lease was taken over changes nothing.
    Returns the new status (or ``"stale"``).
    """
    now = now or utcnow()
    settings = settings or get_settings()
    values: dict = {"last_status_code": outcome.status_code,
                    "last_error": (outcome.error or None) and outcome.error[:MAX_ERROR_TEXT], "lease_expires_at": None}
    if outcome.delivered:
        values |= {"status": "delivered", "delivered_at": now, "last_error": None}
    elif outcome.retryable and claimed.attempt < settings.webhooks_max_attempts:
        delay = retry_delay(claimed.attempt, settings)
        if outcome.retry_after is not None:
            delay = min(max(delay, outcome.retry_after), settings.webhooks_retry_max_seconds)
        values |= {"status": DeliveryStatus.PENDING, "next_attempt_at": now + timedelta(seconds=delay), "published_at": None}
    else:
        values |= {"status": DeliveryStatus.FAILED}
    changed = session.execute(
        update(d).where(d.c.id == claimed.delivery_id, d.c.status == DeliveryStatus.SENDING, d.c.attempts == claimed.attempt)
        .values(**values)
    ).rowcount
    status = values["status"] if changed == 1 else "stale"
    log_event("webhooks.delivery." + status, logging.INFO if status in ("delivered", "stale") else logging.WARNING,
              delivery_id=claimed.delivery_id, endpoint_id=claimed.endpoint_id, event_id=str(claimed.event_id),
              attempt=claimed.attempt, status_code=outcome.status_code)
    return status
