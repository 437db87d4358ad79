"""Issue 18, CLI findings: formulas in CSV exports (item 2) and docs that differ from behaviour
(item 8: beat in the README, ``--limit``).

Real PostgreSQL and the real ``progress-reset`` CLI, in this process through click's ``CliRunner``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from models.audit import record_audit
from models.db import session_scope
from models.queues import QUEUES
from models.settings import get_settings
from producer import webhooks
from tests.test_cli_foundation import invoke
from tests.test_issue13_cli import assert_refused, tenant  # noqa: F401 - fixture
from workers.config import TASK_ROUTES, celery_config

REPO_ROOT = Path(__file__).resolve().parent.parent
WHOLE_TRAIL = ["--from", "2000-01-01", "--to", "2100-01-01"]


# --- item 2: formulas in CSV exports -----------------------------------------------------------

# What a spreadsheet evaluates at the start of a cell (OWASP, CSV injection), written out here
# rather than taken from the code under test.
FORMULA_STARTS = ("=", "+", "-", "@", "\uff1d", "\uff0b", "\uff0d", "\uff20")
CONTROL_STARTS = ("\t", "\r", "\n")
REASONS = ['=HYPERLINK("http://x","click")', "+SUM(1,2)", "-2+3", "@cmd", "\t=1+1", "\r=2+2", "\uff1dSUM(1,2)",
           "'quoted already", 'plain, "with" quotes']
TEXT_COLUMNS = ("created_at", "action", "job_id", "reason", "origin", "details")


def export(organization_id: int, fmt: str) -> str:
    out = invoke("audit", "export", "--organization", str(organization_id), *WHOLE_TRAIL, "--format", fmt)
    assert out.returncode == 0, out.stderr
    return out.stdout


def evaluated_by_a_spreadsheet(cell: str) -> bool:
    return cell.startswith(CONTROL_STARTS) or cell.lstrip().startswith(FORMULA_STARTS)


def test_item2_csv_export_neutralises_formulas_and_jsonl_stays_exact(tenant):
    for reason in REASONS:  # through the CLI, as an admin would type them
        made = invoke("request", "--actor", str(tenant.admin_id), "--course", str(tenant.course_ids[0]),
                      "--reason", reason, "--json")
        assert made.returncode == 0, made.stderr
    with session_scope() as session:  # other text columns, as a service on the Python API could set them
        record_audit(session, "@SUM(1+1)", tenant.organization_id, actor_id=tenant.admin_id, reason="  -1",
                     origin=" =cmd|' /C calc'!A0")

    events = [json.loads(line) for line in export(tenant.organization_id, "jsonl").splitlines()]
    rows = list(csv.DictReader(io.StringIO(export(tenant.organization_id, "csv"), newline="")))
    assert len(rows) == len(events) >= len(REASONS) + 1

    # JSON lines are exact: the reasons as they were stored (stripped on input: "\t=1+1" is "=1+1").
    assert [e["reason"] for e in events if e["action"] == "reset.requested"] == [r.strip() for r in REASONS]
    assert [(e["action"], e["reason"], e["origin"]) for e in events][-1] == ("@SUM(1+1)", "  -1",
                                                                            " =cmd|' /C calc'!A0")
    # No CSV cell starts a formula, and dropping one leading "'" gives back the exact text.
    for event, row in zip(events, rows):
        for column in TEXT_COLUMNS:
            cell = row[column]
            assert not evaluated_by_a_spreadsheet(cell), (column, cell)
            exact = json.dumps(event[column], sort_keys=True, separators=(",", ":")) if column == "details" \
                else "" if event[column] is None else event[column]
            assert (cell[1:] if cell.startswith("'") else cell) == exact, (column, cell, exact)
    reasons = [row["reason"] for row in rows if row["action"] == "reset.requested"]
    assert reasons[4] == "'=1+1"  # the tab was stripped on input; the export is safe regardless
    assert reasons[:4] == ["'" + r for r in REASONS[:4]]
    assert reasons[7] == "''quoted already" and reasons[8] == 'plain, "with" quotes'
    assert [rows[-1][c] for c in ("action", "reason", "origin")] == ["'@SUM(1+1)", "'  -1", "' =cmd|' /C calc'!A0"]


# --- item 8: docs that differ from behaviour -------------------------------------------------------

def test_item8_readme_by_hand_starts_beat_which_schedules_the_sweep():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Trying it by hand", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    beats = [c for c in commands if "celery -A workers beat" in c]
    assert len(beats) == 1, commands  # exactly one beat
    worker = next(c for c in commands if "celery -A workers worker" in c)
    consumed = set(worker.split(" -Q ", 1)[1].split()[0].split(","))
    assert consumed == set(QUEUES)
    # What beat schedules is consumed by that worker, and the text says what is lost without it.
    scheduled = {entry["task"] for entry in celery_config(get_settings())["beat_schedule"].values()}
    assert scheduled == {"maintenance.sweep", "campaigns.dispatch_due"}
    assert {TASK_ROUTES[name]["queue"] for name in scheduled} <= consumed
    assert "maintenance.sweep" in section and "stays `queued`" in section


def test_item8_limit_help_shows_the_range_the_command_accepts(tenant, use_env):
    use_env(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true")
    with session_scope() as session:
        endpoint = webhooks.create_endpoint(session, tenant.organization_id, "http://127.0.0.1:9/hook",
                                            ["reset.succeeded"])["id"]
    listings = {
        ("jobs", "list"): ["--organization", str(tenant.organization_id)],
        ("webhook", "deliveries"): [str(endpoint), "--organization", str(tenant.organization_id)],
        ("dead-batches",): [],
    }
    for command, args in listings.items():
        helped = invoke(*command, "--help")
        line = " ".join(helped.stdout.split("--limit", 1)[1].split("--", 1)[0].split())
        highest = int(line.split("1<=x<=", 1)[1].split("]", 1)[0])
        ok = invoke(*command, *args, "--limit", str(highest), "--json")
        assert ok.returncode == 0, (command, ok.stderr)
        assert_refused(invoke(*command, *args, "--limit", str(highest + 1)), "--limit",
                       f"must be at most {highest}")
        if command != ("dead-batches",):
            assert highest == 200, (command, line)  # the page size every listing accepts
