"""Signing job events, so a receiver can tell they came from this system and were not replayed.

``X-Signature: t=<unix>,v1=<hex>[,v1=<hex>]``: HMAC-SHA256 of ``"<timestamp>.<body>"`` with the
endpoint's secret, one ``v1`` per secret in use (two during a rotation's overlap). Every attempt
of an event sends the same body and the same event id (``X-Event-Id``), by which a receiver
deduplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import json

SIGNATURE_HEADER = "X-Signature"
EVENT_ID_HEADER = "X-Event-Id"


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
