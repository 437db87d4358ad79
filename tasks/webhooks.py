"""Job events to subscribing services: the ``webhooks.deliver`` task (queue ``webhooks``) and its sweep.

The outbox rows (``webhook_deliveries``) are written in the transaction of the
job's state change (:mod:`models.webhooks`); each new row publishes
``webhooks.deliver [endpoint_id]`` after that commit. A run delivers that
endpoint's due rows one by one:

    pending --claim--> sending --2xx--> delivered
                          |--5xx, 408, 429, timeout, connection error--> pending (backoff + jitter,
                          |       or Retry-After) ... --> failed (WEBHOOKS_MAX_ATTEMPTS)
                          |--other 4xx, 3xx, URL no longer allowed--> failed
                          '--worker killed--> still sending; claimable again once its lease ends

Guarantees:

- **at least once, same event id**: a row is marked only after the receiver
  answered; a worker killed in between leaves it ``sending`` under a lease
  (timeout + margin), after which it is claimed and sent again with the same
  event id and body. Receivers deduplicate on ``X-Event-Id``.
- **ordered per job**: a delivery is claimable only when no earlier delivery
  of the same job to the same endpoint is still pending or sending.
- **bounded**: the HTTP call has short timeouts (``WEBHOOKS_TIMEOUT_SECONDS``),
  redirects are not followed, and a run stops claiming after about a second
  and hands the rest back to the queue. A hanging receiver holds one webhooks
  worker slot for at most the timeout, and never a reset worker.
- **nothing is stranded**: a retry falling due or a lease ending is awakened
  by one countdown task (at most a minute) per endpoint (``wake_at``); a
  message lost by the broker is re-published by :func:`sweep_webhooks`, which
  the maintenance sweep calls.

The plain functions take a Session and never commit; :func:`deliver_endpoint`
owns the short transactions and never holds one open during the HTTP call.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from models import webhooks as outbox
from models.db import session_scope
from models.errors import ValidationFailed
from models.jobs import as_utc, utcnow
from models.logs import log_event
from models.schema import WebhookDelivery, WebhookEndpoint, WebhookEvent
from models.settings import Settings, get_settings
from models.messaging import publish_after_commit, send_now
from models.states import OPEN_DELIVERY_STATES, DeliveryStatus
from tasks.base import backoff_seconds, project_task
from tasks.notify_backends import parse_retry_after

TASK_NAME = outbox.DELIVER_TASK
# A run stops claiming after this long and re-publishes itself.
RUN_BUDGET_SECONDS = 1.0
# A claimed delivery is the claimer's for the HTTP timeout plus this margin; then anyone may retry it.
LEASE_MARGIN_SECONDS = 10.0
# The longest countdown a wake-up task uses; a longer wait is bridged by successive wake-ups.
MAX_WAKE_SECONDS = 60.0
# Bytes of the receiver's answer kept in the delivery log.
MAX_ERROR_TEXT = 300
USER_AGENT = "progress-reset-webhooks/1"

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
class Outcome:
    delivered: bool
    retryable: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


def _lease_seconds(settings: Settings) -> float:
    return settings.webhooks_timeout_seconds * 3 + LEASE_MARGIN_SECONDS


def _not_blocked():
    """No earlier delivery of the same job to the same endpoint is still open (per-job order)."""
    earlier = aliased(WebhookDelivery.__table__)
    return ~exists().where(earlier.c.endpoint_id == d.c.endpoint_id, earlier.c.job_id == d.c.job_id,
                           earlier.c.id < d.c.id, earlier.c.status.in_(OPEN_DELIVERY_STATES))


def _claimable(now: datetime):
    return and_(
        or_(and_(d.c.status == DeliveryStatus.PENDING, d.c.next_attempt_at <= now),
            and_(d.c.status == DeliveryStatus.SENDING, d.c.lease_expires_at < now)),
        _not_blocked(),
    )


def claim_next_delivery(session: Session, endpoint_id: int, now: datetime | None = None,
                        settings: Settings | None = None) -> ClaimedDelivery | None:
    """Claim the endpoint's oldest due delivery whose job has no earlier one unfinished; None if none.

    The claim is a conditional UPDATE (status and attempts unchanged), so two
    runs never own one row; the row is ``sending`` under a lease.
    """
    now = now or utcnow()
    settings = settings or get_settings()
    endpoint = session.execute(select(e.c.url, e.c.secret, e.c.previous_secret, e.c.previous_secret_expires_at)
                               .where(e.c.id == endpoint_id, e.c.deleted_at.is_(None))).first()
    if endpoint is None:
        return None
    for _ in range(5):
        row = session.execute(
            select(d.c.id, d.c.status, d.c.attempts, d.c.event_id).where(d.c.endpoint_id == endpoint_id,
                                                                          _claimable(now))
            .order_by(d.c.id).limit(1).with_for_update(skip_locked=True, of=d)
        ).first()
        if row is None:
            return None
        claimed = session.execute(
            update(d).where(d.c.id == row.id, d.c.status == row.status, d.c.attempts == row.attempts)
            .values(status=DeliveryStatus.SENDING, attempts=row.attempts + 1, last_attempt_at=now,
                    lease_expires_at=now + timedelta(seconds=_lease_seconds(settings)))
        ).rowcount
        if claimed == 1:
            event = session.execute(select(ev.c.type, ev.c.payload).where(ev.c.id == row.event_id)).one()
            in_use = [endpoint.secret]
            if endpoint.previous_secret and as_utc(endpoint.previous_secret_expires_at) > now:
                in_use.append(endpoint.previous_secret)
            return ClaimedDelivery(row.id, endpoint_id, row.attempts + 1, endpoint.url, in_use, row.event_id,
                                   event.type, event.payload)
    return None  # pragma: no cover - five lost races in a row


def next_wake(session: Session, endpoint_id: int, now: datetime) -> datetime | None:
    """When the endpoint's next open delivery becomes claimable (a retry falls due, a lease ends), if later.

    Deliveries waiting behind an earlier one of their job are left out: they
    are claimed by the run that finishes the earlier one.
    """
    due = session.scalar(
        select(func.min(d.c.next_attempt_at)).where(d.c.endpoint_id == endpoint_id, d.c.status == DeliveryStatus.PENDING,
                                                    d.c.next_attempt_at > now, _not_blocked()))
    lease = session.scalar(
        select(func.min(d.c.lease_expires_at)).where(d.c.endpoint_id == endpoint_id, d.c.status == DeliveryStatus.SENDING,
                                                     d.c.lease_expires_at > now))
    times = [as_utc(t) for t in (due, lease) if t is not None]
    return min(times) if times else None


def schedule_wake(session: Session, endpoint_id: int, now: datetime) -> float | None:
    """Publish one countdown task (at most a minute) for the endpoint's next wait, unless one wakes earlier.

    ``wake_at`` on the endpoint is claimed with a conditional UPDATE, so waiting
    runs do not multiply. Returns the countdown, or None (nothing open, or
    another task already wakes earlier).
    """
    at = next_wake(session, endpoint_id, now)
    if at is None:
        return None
    # A longer wait is bridged by a wake-up a minute from now, which looks again (one chain per
    # endpoint): a countdown never comes near the broker's visibility timeout.
    at = min(at, now + timedelta(seconds=MAX_WAKE_SECONDS))
    countdown = max(0.0, (at - now).total_seconds())
    taken = session.execute(
        update(e).where(e.c.id == endpoint_id, e.c.deleted_at.is_(None),
                        or_(e.c.wake_at.is_(None), e.c.wake_at <= now, e.c.wake_at > at))
        .values(wake_at=at)
    ).rowcount
    if taken != 1:
        return None
    d_published = update(d).where(d.c.endpoint_id == endpoint_id, d.c.status.in_(OPEN_DELIVERY_STATES)).values(
        published_at=at)
    session.execute(d_published)
    publish_after_commit(session, TASK_NAME, [endpoint_id], countdown=countdown + 0.05)
    return countdown


def retry_delay(attempt: int, settings: Settings) -> float:
    """Seconds before a delivery that failed on ``attempt`` is tried again (the project's one backoff)."""
    return backoff_seconds(attempt, settings.webhooks_retry_base_seconds, settings.webhooks_retry_max_seconds)


def record_outcome(session: Session, claimed: ClaimedDelivery, outcome: Outcome, now: datetime | None = None,
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


# --- the HTTP call ------------------------------------------------------------------------------

def send_delivery(claimed: ClaimedDelivery, settings: Settings, client: httpx.Client | None = None) -> Outcome:
    """POST the event to the endpoint, signed; classify the answer. Never raises for the receiver's faults."""
    try:
        outbox.check_url(claimed.url, settings.webhooks_allow_http_loopback)
    except ValidationFailed as exc:
        return Outcome(False, False, error=f"refused: {exc}")
    body = outbox.body_bytes(claimed.payload)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        outbox.SIGNATURE_HEADER: outbox.signature_header(claimed.secrets, timestamp, body),
        outbox.EVENT_ID_HEADER: str(claimed.event_id),
        "X-Event-Type": claimed.event_type,
        "X-Delivery-Id": str(claimed.delivery_id),
        "X-Delivery-Attempt": str(claimed.attempt),
    }
    timeout = settings.webhooks_timeout_seconds
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)), follow_redirects=False,
                                    trust_env=False)
    try:
        response = client.post(claimed.url, content=body, headers=headers)
    except httpx.TimeoutException:
        return Outcome(False, True, error=f"timed out after {timeout:g}s")
    except httpx.HTTPError as exc:
        return Outcome(False, True, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        if own:
            client.close()
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(True, False, code)
    text = response.text[:MAX_ERROR_TEXT] if response.text else ""
    if code in (408, 429) or code >= 500:
        return Outcome(False, True, code, f"HTTP {code} {text}".strip(),
                       retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if 300 <= code < 400:
        return Outcome(False, False, code, f"HTTP {code}: redirects are not followed; register the final URL")
    return Outcome(False, False, code, f"HTTP {code} {text}".strip())


def deliver_endpoint(endpoint_id: int, settings: Settings | None = None,
                     budget_seconds: float = RUN_BUDGET_SECONDS) -> int:
    """Deliver the endpoint's due rows until none is left or the budget is spent; returns how many were sent.

    Each claim and each outcome is its own short transaction. When the budget
    runs out the task is re-published; when the next delivery is only a short
    wait away (a retry, a lease ending), one countdown task wakes for it.
    """
    settings = settings or get_settings()
    started = time.monotonic()
    sent = 0
    with httpx.Client(timeout=httpx.Timeout(settings.webhooks_timeout_seconds,
                                            connect=min(settings.webhooks_timeout_seconds, 3.0)),
                      follow_redirects=False, trust_env=False) as client:
        while True:
            with session_scope() as session:
                claimed = claim_next_delivery(session, endpoint_id, settings=settings)
            if claimed is None:
                break
            outcome = send_delivery(claimed, settings, client)
            sent += 1
            with session_scope() as session:
                record_outcome(session, claimed, outcome, settings=settings)
            if time.monotonic() - started >= budget_seconds:
                send_now(TASK_NAME, [endpoint_id])
                return sent
    with session_scope() as session:
        schedule_wake(session, endpoint_id, utcnow())
    return sent


@project_task(TASK_NAME)
def deliver(endpoint_id: int) -> None:
    """Deliver one endpoint's due job events (ids only in the message: the endpoint's id)."""
    deliver_endpoint(int(endpoint_id))


# --- publishing, and the sweep --------------------------------------------------------------------



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
        publish_after_commit(session, TASK_NAME, [endpoint_id])
    if endpoints:
        log_event("webhooks.sweep.republished", endpoints=len(endpoints), deliveries=len(rows))
    return len(endpoints)
