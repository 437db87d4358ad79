"""What every call out of the system shares: signing with Standard Webhooks, reading a receiver's
``Retry-After``, and keeping e-mail addresses out of the failure reasons that are stored and logged."""

from __future__ import annotations

import email.utils
import re
import time
from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook

# A Retry-After beyond this is treated as this (a provider asking for days is misconfigured).
MAX_RETRY_AFTER_SECONDS = 3600.0

_ADDRESS_RE = re.compile(r"[^\s<>\"'(),;:@]+@[^\s<>\"'(),;:@]+")


def redact(text: str, limit: int = 500) -> str:
    """``text`` with e-mail addresses replaced by ``<address>``, cut to ``limit`` characters."""
    return _ADDRESS_RE.sub("<address>", text)[:limit]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), at most
    ``MAX_RETRY_AFTER_SECONDS``; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def standard_webhook_headers(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one request: ``webhook-id``, ``webhook-timestamp`` and
    ``webhook-signature`` (one ``v1,<base64>`` per secret, space-separated).

    A ``whsec_`` secret is read as the specification says (base64 of the key, the library's
    reading); any other text is used as the key's bytes as they are.
    """
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    signatures = " ".join(
        Webhook(secret if secret.startswith("whsec_") else secret.encode()).sign(message_id, moment, body)
        for secret in secrets)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}
