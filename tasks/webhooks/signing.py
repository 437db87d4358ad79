"""Signing job events, so a receiver can tell they came from this system and were not replayed.

Every attempt of an event sends the same body and the same event id, by which a receiver
deduplicates. Two signature forms are sent, both over the exact body bytes:

- **Standard Webhooks** (the current form, verified by any Standard Webhooks SDK):
  ``webhook-id`` (the event id), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``:
  ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, space-separated, one per secret in use
  (two during a rotation's overlap). The secret is ``whsec_`` and the base64 of the key bytes;
  signing is the ``standardwebhooks`` library's (:func:`tasks.outbound.standard_webhook_headers`),
  so the two sides cannot drift apart.
- **``X-Signature``** (the older form, kept for receivers already built on it):
  ``t=<unix>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>" with the secret's text>[,v1=...]``, with
  the event id in ``X-Event-Id``.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from tasks.outbound.signatures import standard_webhook_headers

SIGNATURE_HEADER = "X-Signature"
EVENT_ID_HEADER = "X-Event-Id"


def body_bytes(payload: dict) -> bytes:
    """The exact bytes sent for ``payload``: every attempt of an event sends the same body."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def signed_headers(secrets_in_use: list[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Both signature forms for one attempt: the Standard Webhooks headers and the older ``X-Signature``."""
    return standard_webhook_headers(secrets_in_use, message_id, timestamp, body) | {
        SIGNATURE_HEADER: signature_header(secrets_in_use, timestamp, body),
        EVENT_ID_HEADER: message_id,
    }


# --- the older form --------------------------------------------------------------------------------

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` with ``secret``'s text (the ``X-Signature`` form)."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets_in_use: list[str], timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex>[,v1=<hex>]``: one ``v1`` per secret in use (two during a rotation's overlap)."""
    return ",".join([f"t={timestamp}"] + [f"v1={sign(s, timestamp, body)}" for s in secrets_in_use])


def verify_signature(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver of the older form does: any ``v1`` matches, and ``t`` is within ``tolerance``
    seconds of now."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k.strip() == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit() or abs(now - int(stamps[0])) > tolerance:
        return False
    expected = sign(secret, int(stamps[0]), body)
    return any(hmac.compare_digest(expected, v.strip()) for k, v in parts if k.strip() == "v1")
