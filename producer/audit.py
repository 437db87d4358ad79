"""Reading the audit trail out: one page at a time (``GET /v1/audit``) or all of it (``audit export``).

The trail is append-only in the database itself (PostgreSQL triggers refuse
UPDATE, DELETE and TRUNCATE of ``audit_events``, migration 0005), so an export
is a faithful copy. Rows are read in ``(created_at, id)`` order through
``ix_audit_events_org_created``; the export streams them through a server-side
cursor, so its memory does not grow with the number of rows. Functions take a
``Session`` and never commit.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from models.errors import NotFound, ValidationFailed
from models.schema import AuditEvent, Organization
from models.times import as_utc, parse_instant
from producer.pages import Filter, KeysetOrder, fetch_page, filter_values, instant_key, int_key

EXPORT_FORMATS = ("jsonl", "csv")
COLUMNS = ("id", "created_at", "action", "organization_id", "actor_id", "course_id", "learner_id", "job_id",
           "campaign_id", "learner_count", "reason", "origin", "details")
MAX_ACTION = 64
EXPORT_FETCH_ROWS = 2000
# What a spreadsheet may evaluate at the start of a cell (OWASP, CSV injection), and what else
# gets the leading "'" so that it reads back unambiguously.
FORMULA_STARTS = frozenset("=+-@\uff1d\uff0b\uff0d\uff20")
CELL_ESCAPED = FORMULA_STARTS | frozenset("\t\r\n'")

a = AuditEvent.__table__.c
OLDEST_EVENTS_FIRST = KeysetOrder((a.created_at, a.id), (instant_key, int_key))


def describe_event(row) -> dict:
    return {
        "id": row.id,
        "created_at": as_utc(row.created_at).isoformat(),
        "action": row.action,
        "organization_id": row.organization_id,
        "actor_id": row.actor_id,
        "course_id": row.course_id,
        "learner_id": row.learner_id,
        "job_id": str(row.job_id) if row.job_id is not None else None,
        "campaign_id": row.campaign_id,
        "learner_count": row.learner_count,
        "reason": row.reason,
        "origin": row.origin,
        "details": row.details or {},
    }


def _query(organization_id: int, date_from: datetime | None, date_to: datetime | None, action: Filter[str],
           course_id: Filter[int]) -> Select:
    actions, courses = filter_values("action", action), filter_values("course_id", course_id)
    if any(not 0 < len(value) <= MAX_ACTION for value in actions):
        raise ValidationFailed(f"action must be 1 to {MAX_ACTION} characters, e.g. reset.confirmed")
    if date_from is not None and date_to is not None and date_from >= date_to:
        raise ValidationFailed("from must be earlier than to")
    query = select(*[a[name] for name in COLUMNS]).where(a.organization_id == organization_id)
    if date_from is not None:
        query = query.where(a.created_at >= date_from)
    if date_to is not None:
        query = query.where(a.created_at < date_to)
    if actions:
        query = query.where(a.action.in_(actions))
    if courses:
        query = query.where(a.course_id.in_(courses))
    return query


def list_events(session: Session, organization_id: int, *, date_from: str | datetime | None = None,
                date_to: str | datetime | None = None, action: Filter[str] = None, course_id: Filter[int] = None,
                limit: int | None = None, cursor: str | None = None) -> dict:
    """One page of the organization's audit events, oldest first: ``{"items", "next_cursor"}``.

    ``from`` is inclusive, ``to`` exclusive. Keyset pagination on ``(created_at, id)``.
    ``action`` and ``course_id`` take one value or a list (any of them matches).
    """
    query = _query(organization_id, parse_instant(date_from, "from"), parse_instant(date_to, "to"), action,
                   course_id)
    page, next_cursor = fetch_page(session, query, OLDEST_EVENTS_FIRST, lambda row: (row.created_at, row.id),
                                   limit=limit, cursor=cursor)
    return {"items": [describe_event(r) for r in page], "next_cursor": next_cursor}


def export_events(session: Session, organization_id: int, *, date_from: str | datetime | None = None,
                  date_to: str | datetime | None = None, action: Filter[str] = None, course_id: Filter[int] = None,
                  fmt: str = "jsonl") -> Iterator[str]:
    """The organization's audit events in the range as text chunks (JSON lines, or CSV with a header).

    Validates everything before the first chunk, so a refusal never leaves a
    half-written file. Rows come through a server-side cursor
    (``yield_per``): constant memory whatever the size of the trail.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValidationFailed(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt[:20]!r}")
    if session.get(Organization, organization_id) is None:
        raise NotFound(f"organization {organization_id} not found")
    query = _query(organization_id, parse_instant(date_from, "from"), parse_instant(date_to, "to"), action,
                   course_id).order_by(a.created_at, a.id).execution_options(yield_per=EXPORT_FETCH_ROWS)
    return _render(session.execute(query), fmt)


def spreadsheet_safe(value: object) -> object:
    """A CSV cell no spreadsheet evaluates: text that could start a formula gets a leading ``'``.

    The OWASP rule for CSV injection: a cell must not begin with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return (nor a line feed, nor the full-width
    ``＝ ＋ － ＠`` some spreadsheets also read as formulas), and whitespace in front
    of them does not make them safe. A cell that already begins with ``'`` gets
    one too, so the rule reads back exactly: drop one leading ``'`` from any text
    cell that has one. Numbers are written as they are (ids and counts are never
    negative).
    """
    if not isinstance(value, str) or not value:
        return value
    if value[0] in CELL_ESCAPED or value.lstrip()[:1] in FORMULA_STARTS:
        return "'" + value
    return value


def _render(rows, fmt: str) -> Iterator[str]:
    if fmt == "jsonl":  # exact: JSON has no formulas
        for row in rows:
            yield json.dumps(describe_event(row), sort_keys=True, separators=(",", ":")) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        event = describe_event(row)
        event["details"] = json.dumps(event["details"], sort_keys=True, separators=(",", ":"))
        writer.writerow(["" if event[c] is None else spreadsheet_safe(event[c]) for c in COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
