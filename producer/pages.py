"""Keyset pagination, one way for every listing (jobs, audit events, webhook deliveries).

A cursor is opaque to callers: base64url of a small JSON list holding the sort key of the last
row returned. The next page starts strictly after that key, so rows created between two pages
never shift a page (unlike ``OFFSET``): newer rows sort before the cursor and are simply not in
the rest of the walk. Each page is one index range scan, so it costs the same however many rows
exist.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, select, tuple_, union_all
from sqlalchemy.orm import Session, aliased

from models.errors import ValidationFailed
from models.job_ids import job_uuid
from models.times import as_utc, parse_instant

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_CURSOR = 400
BAD_CURSOR = "cursor is not valid: pass back the next_cursor of the previous page unchanged"
# Values one filter of a listing may take at once (``state=queued&state=running``).
MAX_FILTER_VALUES = 20

T = TypeVar("T")
Filter = T | Sequence[T] | None  # a filter's value: one, several (any of them matches), or none


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def encode_cursor(*key: object) -> str:
    raw = json.dumps([as_utc(k).isoformat() if isinstance(k, datetime) else k if isinstance(k, int) else str(k)
                      for k in key], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, size: int) -> list | None:
    """The key a cursor holds (a list of ``size`` values), None without a cursor; malformed -> ValidationFailed."""
    if cursor is None or cursor == "":
        return None
    if len(cursor) > MAX_CURSOR:
        raise ValidationFailed(BAD_CURSOR)
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationFailed(BAD_CURSOR) from None
    if not isinstance(key, list) or len(key) != size:
        raise ValidationFailed(BAD_CURSOR)
    return key


# How each part of a sort key is read back from a cursor (a malformed part is a bad cursor).
def instant_key(value: object) -> datetime:
    return parse_instant(str(value), "cursor")


def uuid_key(value: object) -> uuid.UUID:
    return job_uuid(str(value))


def int_key(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not a whole number")
    return value


@dataclass(frozen=True)
class KeysetOrder:
    """A listing's order: the columns of its unique sort key, their cursor readers, and the direction."""

    columns: Sequence
    readers: Sequence[Callable[[object], object]]
    descending: bool = False


def fetch_page(session: Session, query: Select, order: KeysetOrder, key_of: Callable[[object], Sequence],
               *, limit: int | None, cursor: str | None, scalars: bool = False,
               any_of: tuple[object, Sequence] | None = None) -> tuple[list, str | None]:
    """One page of ``query`` in ``order``, after ``cursor``: ``(rows, next_cursor)``.

    ``key_of(row)`` gives a row's sort key; ``scalars`` returns the first column of each row (ORM
    objects). ``limit`` and ``cursor`` are checked here (one error message for every listing).
    ``any_of`` = ``(column, values)``: rows whose ``column`` is any of ``values`` (an indexed
    filter given several values), read as one index range scan per value, each stopping after a
    page, and merged: a page still costs the same however many rows match, where an ``IN`` list
    would read and sort every matching row.
    """
    limit = check_limit(limit)
    key = decode_cursor(cursor, len(order.columns))
    if key is not None:
        try:
            values = [read(value) for read, value in zip(order.readers, key)]
        except (TypeError, ValueError, ValidationFailed):
            raise ValidationFailed(BAD_CURSOR) from None
        after = tuple_(*order.columns) if len(order.columns) > 1 else order.columns[0]
        bound = tuple_(*values) if len(values) > 1 else values[0]
        query = query.where(after < bound if order.descending else after > bound)
    ordering = [column.desc() if order.descending else column for column in order.columns]
    if any_of is None:
        statement = query.order_by(*ordering).limit(limit + 1)
    else:
        column, values = any_of
        merged = union_all(*[select(query.where(column == value).order_by(*ordering).limit(limit + 1).subquery())
                             for value in values]).subquery()
        target = aliased(query.column_descriptions[0]["entity"], merged) if scalars else merged
        statement = select(target).order_by(*[merged.c[c.key].desc() if order.descending else merged.c[c.key]
                                              for c in order.columns]).limit(limit + 1)
    result = session.execute(statement)
    rows = list(result.scalars() if scalars else result)
    page = rows[:limit]
    return page, (encode_cursor(*key_of(page[-1])) if len(rows) > limit else None)


def filter_values(name: str, value: object) -> list:
    """The values a listing's filter matches, any of them: ``[]`` without a filter.

    A filter takes one value (``"queued"``, ``12``) or several (a list); repeats
    are dropped, and more than :data:`MAX_FILTER_VALUES` are refused.
    """
    if value is None:
        return []
    values = list(dict.fromkeys(value)) if isinstance(value, (list, tuple, set, frozenset)) else [value]
    if len(values) > MAX_FILTER_VALUES:
        raise ValidationFailed(f"{name} takes at most {MAX_FILTER_VALUES} values, got {len(values)}")
    return values
