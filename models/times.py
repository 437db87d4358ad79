"""Time, one way: the current instant, UTC for values read back, ISO-8601 in and out.

Every stored datetime is UTC. SQLite hands datetimes back without an offset, so values read
from the database go through :func:`as_utc`; values shown to people and services go through
:func:`iso`; values they send go through :func:`parse_instant`.
"""

from __future__ import annotations

from datetime import datetime, timezone

from models.errors import ValidationFailed


def utcnow() -> datetime:
    """The current instant, with its UTC offset."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` with a UTC offset (a naive value read back from SQLite is UTC); None stays None."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def iso(value: datetime | None) -> str | None:
    """An instant as ISO-8601 in UTC, or None."""
    return as_utc(value).isoformat() if value is not None else None


def parse_instant(value: str | datetime | None, name: str) -> datetime | None:
    """An ISO-8601 date or date-time; a value without an offset is UTC. None (or "") stays None.

    Malformed text is refused as :class:`ValidationFailed` naming ``name``.
    """
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
