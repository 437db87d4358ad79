"""The producer's webhook functions: register, list, show, delete endpoints, rotate secrets, the
delivery log and redelivery.

The HTTP API (scoped to the API key's organization) and the CLI (``--organization``)
call these and nothing else. An endpoint of another organization is reported
as not found, exactly like an id that does not exist. Each function takes a
``Session`` and never commits; a redelivery is published after commit.
"""

from __future__ import annotations

import base64
import secrets
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.audit import record_audit
from models.dialect import LockSpace, hold_transaction_lock
from models.errors import Conflict, NotFound, ValidationFailed
from models.job_events import DELIVER_TASK, EVENT_TYPES
from models.messaging import publish_after_commit
from models.receiver_urls import check_url
from models.schema import Organization, WebhookDelivery, WebhookEndpoint, WebhookEvent
from models.settings import get_settings
from models.states import OPEN_DELIVERY_STATES, DeliveryStatus
from models.times import as_utc, iso, utcnow
from producer.pages import Filter, KeysetOrder, fetch_page, filter_values, int_key

MAX_ENDPOINTS_PER_ORGANIZATION = 20
MAX_OVERLAP_SECONDS = 7 * 24 * 3600
DEFAULT_OVERLAP_SECONDS = 24 * 3600
DELIVERY_STATES = tuple(DeliveryStatus)
SECRET_PREFIX = "whsec_"
NEWEST_DELIVERIES_FIRST = KeysetOrder((WebhookDelivery.__table__.c.id,), (int_key,), descending=True)


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks form: ``whsec_`` and the base64 of 32 random
    bytes (any Standard Webhooks SDK takes it as is); shown to the caller once."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def describe_endpoint(row: WebhookEndpoint) -> dict:
    """The endpoint without its secrets."""
    rotating = row.previous_secret is not None and as_utc(row.previous_secret_expires_at) > utcnow()
    return {"id": row.id, "organization_id": row.organization_id, "url": row.url, "events": list(row.events),
            "created_at": iso(row.created_at), "deleted_at": iso(row.deleted_at),
            "previous_secret_expires_at": iso(row.previous_secret_expires_at) if rotating else None}


def _check_events(events) -> list[str]:
    if not isinstance(events, (list, tuple)) or not events:
        raise ValidationFailed(f"events must be a non-empty list of: {', '.join(EVENT_TYPES)}")
    unknown = [str(x)[:40] for x in events if x not in EVENT_TYPES]
    if unknown:
        raise ValidationFailed(f"unknown event {unknown[0]!r}; events are {', '.join(EVENT_TYPES)}")
    return [t for t in EVENT_TYPES if t in events]


def _endpoint(session: Session, organization_id: int, endpoint_id: int, lock: bool = False) -> WebhookEndpoint:
    query = select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
    row = session.scalars(query.with_for_update() if lock else query).first()
    if row is None or row.organization_id != organization_id or row.deleted_at is not None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    return row


def create_endpoint(session: Session, organization_id: int, url: str, events, origin: str = "cli") -> dict:
    """Register a receiver for the organization's job events; the result holds the secret, shown this once."""
    events = _check_events(events)
    url = check_url(url, get_settings().webhooks_allow_http_loopback).url
    if session.get(Organization, organization_id) is None:
        raise NotFound(f"organization {organization_id} not found")
    # One count-then-add at a time per organization (not a row lock: the application only reads organizations).
    hold_transaction_lock(session, LockSpace.WEBHOOK_ENDPOINTS, organization_id)
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(
        WebhookEndpoint.organization_id == organization_id, WebhookEndpoint.deleted_at.is_(None))) or 0
    if count >= MAX_ENDPOINTS_PER_ORGANIZATION:
        raise Conflict(f"organization {organization_id} already has {count} webhook endpoints, the most allowed; "
                       "delete one first")
    secret = new_secret()
    row = WebhookEndpoint(organization_id=organization_id, url=url, events=events, secret=secret,
                          created_at=utcnow())
    session.add(row)
    session.flush()
    record_audit(session, "webhook.created", organization_id, origin=origin,
                 details={"endpoint_id": row.id, "events": events})
    return describe_endpoint(row) | {"secret": secret}


def list_endpoints(session: Session, organization_id: int) -> list[dict]:
    rows = session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.organization_id == organization_id, WebhookEndpoint.deleted_at.is_(None))
        .order_by(WebhookEndpoint.id))
    return [describe_endpoint(r) for r in rows]


def get_endpoint(session: Session, organization_id: int, endpoint_id: int) -> dict:
    return describe_endpoint(_endpoint(session, organization_id, endpoint_id))


def delete_endpoint(session: Session, organization_id: int, endpoint_id: int, origin: str = "cli") -> dict:
    """Stop sending to the endpoint: nothing more is delivered, open deliveries are cancelled."""
    row = _endpoint(session, organization_id, endpoint_id, lock=True)
    now = utcnow()
    row.deleted_at = now
    d = WebhookDelivery.__table__.c
    cancelled = session.execute(update(WebhookDelivery.__table__).where(
        d.endpoint_id == row.id, d.status.in_(OPEN_DELIVERY_STATES)).values(
        status=DeliveryStatus.CANCELLED, lease_expires_at=None, last_error="endpoint deleted")).rowcount or 0
    record_audit(session, "webhook.deleted", organization_id, origin=origin,
                 details={"endpoint_id": row.id, "deliveries_cancelled": cancelled})
    session.flush()
    return describe_endpoint(row)


def rotate_secret(session: Session, organization_id: int, endpoint_id: int,
                  overlap_seconds: int = DEFAULT_OVERLAP_SECONDS, origin: str = "cli") -> dict:
    """A new secret, shown this once; the old one keeps signing (a second ``v1``) for ``overlap_seconds``."""
    if not 0 <= overlap_seconds <= MAX_OVERLAP_SECONDS:
        raise ValidationFailed(f"overlap_seconds must be between 0 and {MAX_OVERLAP_SECONDS} (7 days)")
    row = _endpoint(session, organization_id, endpoint_id, lock=True)
    now = utcnow()
    row.previous_secret = row.secret if overlap_seconds else None
    row.previous_secret_expires_at = now + timedelta(seconds=overlap_seconds) if overlap_seconds else None
    row.secret = new_secret()
    record_audit(session, "webhook.secret_rotated", organization_id, origin=origin,
                 details={"endpoint_id": row.id, "overlap_seconds": overlap_seconds})
    session.flush()
    return describe_endpoint(row) | {"secret": row.secret}


def describe_delivery(row) -> dict:
    return {"delivery_id": row.id, "event_id": str(row.event_id), "event_type": row.type,
            "job_id": str(row.job_id) if row.job_id else None, "status": row.status, "attempts": row.attempts,
            "last_status_code": row.last_status_code, "last_error": row.last_error,
            "next_attempt_at": iso(row.next_attempt_at) if row.status in OPEN_DELIVERY_STATES else None,
            "last_attempt_at": iso(row.last_attempt_at), "delivered_at": iso(row.delivered_at),
            "created_at": iso(row.created_at)}


def _delivery_query(endpoint_id: int):
    d, ev = WebhookDelivery.__table__.c, WebhookEvent.__table__.c
    return (select(d.id, d.event_id, ev.type, d.job_id, d.status, d.attempts, d.last_status_code, d.last_error,
                   d.next_attempt_at, d.last_attempt_at, d.delivered_at, d.created_at)
            .join(WebhookEvent.__table__, ev.id == d.event_id).where(d.endpoint_id == endpoint_id))


def list_deliveries(session: Session, organization_id: int, endpoint_id: int, *, status: Filter[str] = None,
                    limit: int | None = None, cursor: str | None = None) -> dict:
    """The endpoint's delivery log, newest first: ``{"items", "next_cursor"}``; ``status``: one or a list."""
    statuses = filter_values("status", status)
    if any(value not in DELIVERY_STATES for value in statuses):
        raise ValidationFailed(f"status must be one of {', '.join(DELIVERY_STATES)}")
    _endpoint(session, organization_id, endpoint_id)
    d = WebhookDelivery.__table__.c
    query = _delivery_query(endpoint_id)
    if statuses:
        query = query.where(d.status.in_(statuses))
    page, next_cursor = fetch_page(session, query, NEWEST_DELIVERIES_FIRST, lambda row: (row.id,),
                                   limit=limit, cursor=cursor)
    return {"items": [describe_delivery(r) for r in page], "next_cursor": next_cursor}


def redeliver(session: Session, organization_id: int, endpoint_id: int, delivery_id: int,
              origin: str = "cli") -> dict:
    """Send a finished delivery again (same event id and body), with a fresh set of attempts."""
    _endpoint(session, organization_id, endpoint_id)
    d = WebhookDelivery.__table__.c
    now = utcnow()
    changed = session.execute(update(WebhookDelivery.__table__).where(
        d.id == delivery_id, d.endpoint_id == endpoint_id, d.status.in_((DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.CANCELLED)))
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=now, published_at=now, lease_expires_at=None,
                delivered_at=None)).rowcount
    if changed != 1:
        row = session.execute(select(d.status).where(d.id == delivery_id, d.endpoint_id == endpoint_id)).first()
        if row is None:
            raise NotFound(f"delivery {delivery_id} of webhook endpoint {endpoint_id} not found")
        raise Conflict(f"delivery {delivery_id} is {row.status}; it is still being delivered")
    record_audit(session, "webhook.redelivered", organization_id, origin=origin,
                 details={"endpoint_id": endpoint_id, "delivery_id": delivery_id})
    publish_after_commit(session, DELIVER_TASK, [endpoint_id])
    row = session.execute(_delivery_query(endpoint_id).where(d.id == delivery_id)).one()
    return describe_delivery(row)
