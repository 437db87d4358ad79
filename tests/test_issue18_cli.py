"""Issue 18, CLI findings: formulas in CSV exports (item 2), a replayed idempotency key (item 5: the
CLI, and the migration of the keys already stored), output that cannot be written and closed pipes
(item 6), and docs that differ from behaviour (item 8: beat in the README, ``--limit``).

Real PostgreSQL and the real ``progress-reset`` CLI: in this process through click's ``CliRunner``,
and in subprocesses where a real pipe, a real closed reader or a full disk is the point.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text

from models.audit import record_audit
from models.db import make_engine, session_scope
from models.migrate import alembic_config, upgrade
from models.times import utcnow
from models.queues import QUEUES
from models.settings import get_settings
from producer import idempotency, resets, webhooks
from tests.reset_checks import fingerprint
from tests.test_audit_export import bulk_audit
from tests.test_cli_foundation import invoke
from tests.test_http_api import cli_argv
from tests.test_issue13_cli import assert_refused, tenant  # noqa: F401 - fixture
from workers.config import TASK_ROUTES, celery_config

REPO_ROOT = Path(__file__).resolve().parent.parent
WHOLE_TRAIL = ["--from", "2000-01-01", "--to", "2100-01-01"]


def database_state():
    with session_scope() as session:
        return fingerprint(session)


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


# --- item 5: replaying an idempotency key --------------------------------------------------------

def test_item5_cli_request_replay_returns_the_same_token(tenant):
    args = ["request", "--actor", str(tenant.admin_id), "--course", str(tenant.course_ids[0]), "--reason", "again",
            "--idempotency-key", "c1e3a0d4-cli", "--json"]
    first = invoke(*args)
    assert first.returncode == 0, first.stderr
    made = json.loads(first.stdout)
    before = database_state()
    again = invoke(*args)
    assert again.returncode == 0 and json.loads(again.stdout) == {**made, "replayed": True}
    human = invoke(*args[:-1])
    assert "nothing changed" in human.stdout and made["token"] in human.stdout
    assert database_state() == before

    line = assert_refused(invoke(*args[:6], "another reason", *args[7:]), "already used", made["request_id"])
    assert line.startswith("error: idempotency key 'c1e3a0d4-cli' was already used")
    assert database_state() == before
    confirmed = invoke("confirm", made["request_id"], "--actor", str(tenant.admin_id), "--token", made["token"])
    assert confirmed.returncode == 0, confirmed.stderr
    done = json.loads(invoke(*args).stdout)
    assert (done["state"], done["token"], done["replayed"]) == ("queued", None, True)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_item5_migration_keeps_only_a_digest_of_the_keys_already_stored(fresh_db, tmp_path, use_env, backend):
    url = fresh_db() if backend == "postgresql" else f"sqlite:///{tmp_path / 'pr.db'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "0007")
    engine = make_engine(url)
    job_id = uuid.uuid4()
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO reset_jobs (id, organization_id, course_id, scope, state, actor_id, reason, origin, "
                "idempotency_key, params_hash, summary, created_at, learners_total, learners_done, batches_total, "
                "batches_done, batches_dead, cleared, watermarks, purge_total, purge_done) VALUES (:id, 1, 1, "
                "'course', 'expired', 7, '', 'cli', 'lms-7781', '', '{}', :now, 0, 0, 0, 0, 0, '{}', '{}', 0, 0)"),
                {"id": job_id.hex if backend == "sqlite" else job_id, "now": utcnow()})
        upgrade(url)
        assert "idempotency_key" not in {c["name"] for c in inspect(engine).get_columns("reset_jobs")}
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT idempotency_key_hash, sealed_token FROM reset_jobs")).one()
    finally:
        engine.dispose()
    assert stored == (idempotency.key_digest("lms-7781"), None)
    assert "lms-7781" not in stored[0]


# --- item 6: output that cannot be written, readers that go away -------------------------------

EXPORT = ["audit", "export", "--organization", "{org}", *WHOLE_TRAIL]
WRITERS_TO_A_FILE = {"audit export": EXPORT, "audit export csv": [*EXPORT, "--format", "csv"],
                     "openapi": ["openapi"]}


@pytest.fixture
def trail(tenant):
    """The tenant with 3,000 audit events (about 1 MB of JSON lines: far more than a pipe holds)."""
    with session_scope() as session:
        bulk_audit(session, tenant.organization_id, 3000)
    return tenant


@pytest.mark.parametrize("command", sorted(WRITERS_TO_A_FILE))
@pytest.mark.parametrize("target", ["missing folder", "a directory", "a full disk"])
def test_item6_output_file_that_cannot_be_written_is_one_error_line(trail, tmp_path, command, target):
    path = {"missing folder": str(tmp_path / "no" / "such" / "dir" / "x.out"), "a directory": str(tmp_path),
            "a full disk": "/dev/full"}[target]
    reason = {"missing folder": "No such file or directory", "a directory": "Is a directory",
              "a full disk": "No space left on device"}[target]
    args = [a.format(org=trail.organization_id) for a in WRITERS_TO_A_FILE[command]]
    before, listing = database_state(), sorted(os.listdir(tmp_path))
    line = assert_refused(invoke(*args, "--output", path), f"cannot write {path}: {reason}")
    assert line == f"error: cannot write {path}: {reason}"
    assert database_state() == before and sorted(os.listdir(tmp_path)) == listing
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # a device is written to, never removed


def test_item6_output_file_is_written_and_replaced(tenant, tmp_path):
    target = tmp_path / "trail.jsonl"
    target.write_text("old content that is longer than the export\n" * 100)
    done = invoke(*[a.format(org=tenant.organization_id) for a in EXPORT], "--output", str(target))
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    assert target.read_text() == export(tenant.organization_id, "jsonl")
    openapi = tmp_path / "openapi.json"
    assert invoke("openapi", "--output", str(openapi)).returncode == 0
    assert openapi.read_text() == (REPO_ROOT / "docs" / "openapi.json").read_text()


# Commands that write to standard output, one of each group: the streams (exports, the schema),
# listings, reports, changes that print their result, and --help. Every command prints through
# producer.output (or, for the demo's live screen, rich), and a closed pipe anywhere ends in run().
PIPED = {
    "audit export": EXPORT,
    "audit export csv": [*EXPORT, "--format", "csv"],
    "openapi": ["openapi"],
    "--help": ["--help"],
    "db upgrade": ["db", "upgrade"],
    "seed": ["seed", "--learners", "2", "--json"],
    "request": ["request", "--actor", "{admin}", "--course", "{course}", "--json"],
    "confirm": ["confirm", "{request}", "--actor", "{admin}", "--token", "{token}"],
    "status": ["status", "{request}", "--json"],
    "cancel": ["cancel", "{job}", "--actor", "{admin}"],
    "jobs list": ["jobs", "list", "--organization", "{org}", "--json"],
    "campaign create": ["campaign", "create", "--actor", "{admin}", "--course", "{course}", "--cron", "0 9 * * 1"],
    "campaign list": ["campaign", "list", "--actor", "{admin}"],
    "campaign run-due": ["campaign", "run-due", "--json"],
    "api-key create": ["api-key", "create", "--organization", "{org}", "--name", "piped"],
    "api-key list": ["api-key", "list"],
    "webhook list": ["webhook", "list", "--organization", "{org}"],
    "dead-batches": ["dead-batches", "--json"],
}


@pytest.fixture
def piped(trail):
    """What the commands above name: the tenant, a request awaiting confirmation and a queued job."""
    with session_scope() as session:
        made = resets.request(session, trail.admin_id, trail.course_ids[0])
        queued = resets.request(session, trail.admin_id, trail.course_ids[1])
        job = resets.confirm(session, queued.request_id, trail.admin_id, queued.token).job_id
    return {"org": trail.organization_id, "admin": trail.admin_id, "course": trail.course_ids[0],
            "request": made.request_id, "token": made.token, "job": job}


def popen(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cli_argv(*args), cwd=REPO_ROOT, env=dict(os.environ), **kwargs)


@pytest.mark.parametrize("command", sorted(PIPED))
def test_item6_closed_pipe_ends_quietly_with_141(piped, tmp_path, command):
    args = [a.format(**piped) for a in PIPED[command]]
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = popen(args, stdout=subprocess.PIPE, stderr=stderr)
        proc.stdout.close()  # the reader goes away before the command has written anything
        assert proc.wait(timeout=120) == 141
        stderr.seek(0)
        assert stderr.read() == ""
    if command in ("confirm", "cancel"):  # a change is made before its result is printed; only the print is cut
        with session_scope() as session:
            state = resets.status(session, piped["request" if command == "confirm" else "job"])["state"]
        assert state == {"confirm": "queued", "cancel": "cancelled"}[command]


def test_item6_export_into_head_prints_no_traceback(trail):
    writer = popen([a.format(org=trail.organization_id) for a in EXPORT], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # only head holds the pipe now, as in a shell
    first, _ = head.communicate(timeout=120)
    _, errors = writer.communicate(timeout=120)
    assert json.loads(first)["organization_id"] == trail.organization_id and first.count(b"\n") == 1
    assert (writer.returncode, errors) == (141, b"")


@pytest.mark.parametrize("command", ["openapi", "jobs list", "audit export", "status", "--help"])
def test_item6_full_standard_output_is_one_error_line(piped, command):
    args = [a.format(**piped) for a in PIPED[command]]
    with open("/dev/full", "w") as full:
        proc = popen(args, stdout=full, stderr=subprocess.PIPE, text=True)
        _, errors = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert errors.startswith("error: ") and errors.endswith("No space left on device\n"), errors
    assert errors.count("\n") == 1 and "Traceback" not in errors
    if command != "--help":  # click writes the help itself; the error still is one line
        assert errors == "error: cannot write standard output: No space left on device\n"


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
    assert scheduled == {"maintenance.sweep", "campaigns.dispatch_due", "maintenance.retention"}
    assert {TASK_ROUTES[name]["queue"] for name in scheduled} <= consumed
    assert all(f"`{name}`" in section for name in scheduled)
    assert "stays `queued`" in section and "never removed" in section


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
