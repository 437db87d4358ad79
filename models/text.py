"""Text the database can store.

PostgreSQL ``text`` cannot hold the NUL character, and UTF-8 cannot encode a
lone surrogate (what Python makes of bytes that are not UTF-8 on a command
line). Either would fail at the INSERT as a database error; every free-text
input is checked here first and refused as a :class:`ValidationFailed`
naming the field, before anything is written.
"""

from __future__ import annotations

from models.errors import ValidationFailed


def unstorable_character(value: str) -> str | None:
    """A description of the first character ``value`` cannot be stored with, or None."""
    if "\x00" in value:
        return "the NUL character (\\u0000)"
    for ch in value:
        if "\ud800" <= ch <= "\udfff":
            return f"an unpaired surrogate (\\u{ord(ch):04x}; the text is not valid UTF-8)"
    return None


def check_storable(field: str, value: str | None) -> str | None:
    """``value`` unchanged, or :class:`ValidationFailed` if the database cannot store it."""
    if value is None or not isinstance(value, str):
        return value
    problem = unstorable_character(value)
    if problem is not None:
        raise ValidationFailed(f"{field} contains {problem}, which cannot be stored; remove it")
    return value
