"""Keyset pagination shared by every listing (jobs, audit events, webhook deliveries).

A cursor is opaque to callers: base64url of a small JSON list holding the sort
key of the last row returned. The next page starts strictly after that key, so
rows created between two pages never shift a page (unlike ``OFFSET``): newer
rows sort before the cursor and are simply not in the rest of the walk.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone

from models.errors import ValidationFailed

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_CURSOR = 400


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def encode_cursor(*key: object) -> str:
    raw = json.dumps([k.isoformat() if isinstance(k, datetime) else k if isinstance(k, int) else str(k)
                      for k in key], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, size: int) -> list | None:
    """The key a cursor holds (a list of ``size`` values), None without a cursor; malformed -> ValidationFailed."""
    if cursor is None or cursor == "":
        return None
    bad = ValidationFailed("cursor is not valid: pass back the next_cursor of the previous page unchanged")
    if len(cursor) > MAX_CURSOR:
        raise bad
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    if not isinstance(key, list) or len(key) != size:
        raise bad
    return key


def cursor_datetime(value: object) -> datetime:
    try:
        return parse_instant(str(value), "cursor")
    except ValidationFailed:
        raise ValidationFailed("cursor is not valid: pass back the next_cursor of the previous page unchanged") \
            from None


def parse_instant(value: str | datetime | None, name: str) -> datetime | None:
    """An ISO-8601 date or date-time; a value without an offset is UTC. None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValidationFailed(f"{name} must be an ISO-8601 date or date-time, got {value[:40]!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)
