"""The audit trail: append-only in PostgreSQL, read by pages (``GET /v1/audit``) or exported whole
(``progress-reset audit export``) in constant memory."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from models.audit import record_audit
from models.db import session_scope
from models.errors import NotFound, ValidationFailed
from models.schema import AuditEvent
from models.times import utcnow
from models.training import create_organization
from producer import audit
from tests.test_http_api import (  # noqa: F401 - fixtures
    api_env,
    assert_problem,
    run_cli,
    start_api,
    tenants,
)

START = utcnow().replace(microsecond=0) - timedelta(days=400)


def bulk_audit(session, organization_id: int, count: int, course_id: int = 7) -> None:
    """``count`` events one minute apart from START, in one statement (fast at 100,000)."""
    session.execute(text("""
        INSERT INTO audit_events (organization_id, actor_id, action, course_id, learner_count, reason, origin,
                                  details, created_at)
        SELECT :org, 1, CASE WHEN g % 2 = 0 THEN 'reset.succeeded' ELSE 'reset.confirmed' END,
               CASE WHEN g % 5 = 0 THEN :course ELSE NULL END, g, 'bulk, "quoted"', 'cli', '{"n": 1}',
               CAST(:start AS timestamptz) + interval '1 minute' * g
        FROM generate_series(0, CAST(:count AS int) - 1) g"""),
        {"org": organization_id, "count": count, "course": course_id, "start": START})


# --- append-only -----------------------------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET reason = 'rewritten'",
    "UPDATE audit_events SET reason = 'x' WHERE id = -1",
    "DELETE FROM audit_events",
    "DELETE FROM audit_events WHERE id = -1",
    "TRUNCATE audit_events",
])
def test_postgresql_refuses_to_change_or_remove_audit_events(db_session, statement):
    org = create_organization(db_session, "Auditors")
    record_audit(db_session, "reset.requested", org.id, reason="kept")
    db_session.flush()
    before = db_session.scalar(select(func.count()).select_from(AuditEvent))
    with pytest.raises(DBAPIError) as refused:
        with db_session.begin_nested():
            db_session.execute(text(statement))
    assert "audit_events is append-only" in str(refused.value)
    assert db_session.scalar(select(func.count()).select_from(AuditEvent)) == before
    assert db_session.scalar(select(AuditEvent.reason).where(AuditEvent.organization_id == org.id)) == "kept"


# --- pages -------------------------------------------------------------------------------------------

def test_pages_filters_and_organizations(db_session):
    org = create_organization(db_session, "Paged")
    other = create_organization(db_session, "Other")
    bulk_audit(db_session, org.id, 250)
    bulk_audit(db_session, other.id, 20)
    seen, cursor = [], None
    while True:
        page = audit.list_events(db_session, org.id, limit=40, cursor=cursor)
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 250 and len({e["id"] for e in seen}) == 250
    assert {e["organization_id"] for e in seen} == {org.id}
    assert [e["created_at"] for e in seen] == sorted(e["created_at"] for e in seen)

    window = audit.list_events(db_session, org.id, date_from=(START + timedelta(minutes=10)).isoformat(),
                               date_to=(START + timedelta(minutes=20)).isoformat(), limit=200)["items"]
    assert [e["learner_count"] for e in window] == list(range(10, 20))
    only = audit.list_events(db_session, org.id, action="reset.succeeded", course_id=7, limit=200)["items"]
    assert len(only) == 25 and all(e["action"] == "reset.succeeded" and e["course_id"] == 7 for e in only)

    for kwargs, fragment in (({"limit": 0}, "limit"), ({"date_from": "monday"}, "from must be an ISO-8601"),
                             ({"date_from": "2026-02-01", "date_to": "2026-01-01"}, "from must be earlier"),
                             ({"cursor": "zzz"}, "cursor is not valid"), ({"action": ""}, None)):
        if fragment is None:
            continue
        with pytest.raises(ValidationFailed) as refused:
            audit.list_events(db_session, org.id, **kwargs)
        assert fragment in str(refused.value)


def _peak_bytes(session, organization_id: int) -> tuple[int, int]:
    tracemalloc.start()
    try:
        lines = 0
        for chunk in audit.export_events(session, organization_id, fmt="jsonl"):
            lines += chunk.count("\n")
        return lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_memory_does_not_grow_with_the_trail(db_session):
    small, large = create_organization(db_session, "Small"), create_organization(db_session, "Large")
    bulk_audit(db_session, small.id, 10_000)
    bulk_audit(db_session, large.id, 100_000)
    lines_small, peak_small = _peak_bytes(db_session, small.id)
    lines_large, peak_large = _peak_bytes(db_session, large.id)
    print(f"\nexport peak Python memory: 10,000 events {peak_small / 1e6:.1f} MB, "
          f"100,000 events {peak_large / 1e6:.1f} MB")
    assert (lines_small, lines_large) == (10_000, 100_000)
    assert peak_large < peak_small * 1.5 + 1_000_000, "ten times the rows must not take ten times the memory"

    with pytest.raises(NotFound):
        audit.export_events(db_session, 999_999)
    with pytest.raises(ValidationFailed):
        audit.export_events(db_session, small.id, fmt="xml")


# --- CLI and HTTP -------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_cli_export_jsonl_and_csv_and_http_pages(api_env, tenants, start_api, tmp_path):
    a, b = tenants.a, tenants.b
    with session_scope() as session:
        bulk_audit(session, a.organization_id, 3000)
        bulk_audit(session, b.organization_id, 10)
    start, end = START.isoformat(), (START + timedelta(minutes=3000)).isoformat()

    jsonl = run_cli(api_env, "audit", "export", "--organization", str(a.organization_id), "--from", start,
                    "--to", end)
    assert jsonl.returncode == 0, jsonl.stderr
    events = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(events) == 3000 and {e["organization_id"] for e in events} == {a.organization_id}
    assert events[0]["reason"] == 'bulk, "quoted"' and events[0]["details"] == {"n": 1}

    target = tmp_path / "trail.csv"
    done = run_cli(api_env, "audit", "export", "--organization", str(a.organization_id), "--from", start,
                   "--to", end, "--format", "csv", "--action", "reset.succeeded", "--output", str(target))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(rows) == 1500 and {r["action"] for r in rows} == {"reset.succeeded"}
    assert rows[0]["reason"] == 'bulk, "quoted"' and json.loads(rows[0]["details"]) == {"n": 1}

    for args, fragment in ((["--organization", "999999"], "error: organization 999999 not found"),
                           (["--organization", str(a.organization_id), "--from", "soon"], "error: from must be"),
                           (["--organization", str(a.organization_id), "--format", "xml"], "error: argument")):
        base = {"--from": start, "--to": end}
        for i in range(0, len(args), 2):
            base[args[i]] = args[i + 1]
        refused = run_cli(api_env, "audit", "export", *[x for kv in base.items() for x in kv],
                          "--output", str(tmp_path / "refused.jsonl"))
        assert refused.returncode != 0 and refused.stderr.startswith(fragment), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused.jsonl").exists()

    server = start_api(api_env)
    with server.client(a.key) as api:
        seen, cursor = [], None
        while True:
            page = api.get("/v1/audit", params={"limit": 200, "from": start, "to": end,
                                                **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            seen.extend(e["id"] for e in page.json()["items"])
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
        assert seen == [e["id"] for e in events]
        assert_problem(api.get("/v1/audit", params={"from": "x"}), 422, "validation_failed")
        assert_problem(api.get("/v1/audit", params={"limit": 201}), 422, "validation_failed")
    with server.client(b.key) as api:
        theirs = api.get("/v1/audit", params={"limit": 200, "from": start, "to": end}).json()["items"]
        assert len(theirs) == 10 and {e["organization_id"] for e in theirs} == {b.organization_id}
