"""Reading what an outside party answered: its ``Retry-After``, and failure reasons kept free of
e-mail addresses before they are stored and logged."""

from __future__ import annotations

import email.utils
import re
import time
from datetime import timezone

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
