"""Job events for subscribing services: the outbox, the payloads, signatures and receiver URLs.

:func:`record_job_event` is called by :func:`models.jobs.record_audit`, so an
event is written in the very transaction of the state change it reports
(confirm, cancel, a campaign's occurrence, a job's finalize): if that
transaction rolls back there is no event, and if it commits the event is in
the outbox. One ``webhook_deliveries`` row per subscribed endpoint of the
organization is the delivery's outbox row and its log. Sending is the
``webhooks.deliver`` task's business (``tasks/webhooks.py``); each new delivery
publishes that task by name after the commit (:mod:`models.messaging`).

Payloads hold ids and counts only: never cleared data, never names or e-mails.
Functions take a ``Session`` and never commit.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import uuid
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from models.errors import ValidationFailed
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

SIGNATURE_HEADER = "X-Signature"
EVENT_ID_HEADER = "X-Event-Id"
MAX_URL = 2000
SECRET_PREFIX = "whsec_"
DELIVER_TASK = "webhooks.deliver"

def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


# --- the outbox ---------------------------------------------------------------------------------

def job_event_payload(session: Session, event_id: uuid.UUID, event_type: str, job: ResetJob,
                      created_at: datetime, actor_id: int | None) -> dict:
    """The event body: the job's status at the moment of the change (the shape of ``GET /v1/resets/{id}``)
    plus who acted, why and from where. Ids and counts only, never personal data."""
    from models.jobs import describe_status  # models.jobs imports this module

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


# --- signatures ---------------------------------------------------------------------------------

def body_bytes(payload: dict) -> bytes:
    """The exact bytes sent for ``payload``: every attempt of an event sends the same body."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` with ``secret``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets_in_use: list[str], timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex>[,v1=<hex>]``: one ``v1`` per secret in use (two during a rotation's overlap)."""
    return ",".join([f"t={timestamp}"] + [f"v1={sign(s, timestamp, body)}" for s in secrets_in_use])


def verify_signature(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does: any ``v1`` matches, and ``t`` is within ``tolerance`` seconds of now."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k.strip() == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit() or abs(now - int(stamps[0])) > tolerance:
        return False
    expected = sign(secret, int(stamps[0]), body)
    return any(hmac.compare_digest(expected, v.strip()) for k, v in parts if k.strip() == "v1")


# --- receiver URLs ------------------------------------------------------------------------------

def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise ValidationFailed(f"webhook URL host {host[:100]!r} does not resolve") from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def check_url(url: str, allow_http_loopback: bool) -> str:
    """The receiver URL, or ``ValidationFailed`` saying why not.

    https only; plain http only to a loopback address and only when
    ``WEBHOOKS_ALLOW_HTTP_LOOPBACK`` is on (development, tests). Addresses that
    are not public (private, loopback, link-local such as the cloud metadata
    service, reserved, multicast) are refused unless that setting is on, so an
    endpoint cannot make the workers reach into the internal network. Checked
    at registration and again before each attempt (the name may resolve
    elsewhere later).
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL or not url.isprintable() or " " in url:
        raise ValidationFailed(f"webhook URL must be an https:// URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValidationFailed("webhook URL is malformed (bad host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.hostname:
        raise ValidationFailed("webhook URL must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("webhook URL must not carry credentials; verify the X-Signature header instead")
    if parts.fragment:
        raise ValidationFailed("webhook URL must not have a #fragment")
    addresses = _addresses(parts.hostname, port or (443 if scheme == "https" else 80))
    if scheme == "http" and not (allow_http_loopback and all(a.is_loopback for a in addresses)):
        raise ValidationFailed("webhook URL must use https (plain http is accepted only to a loopback address "
                               "with WEBHOOKS_ALLOW_HTTP_LOOPBACK=true)")
    if not allow_http_loopback:
        for address in addresses:
            if not address.is_global or address.is_multicast:
                raise ValidationFailed(f"webhook URL resolves to {address}, which is not a public address; "
                                       "private, loopback and link-local receivers are refused")
    return url
