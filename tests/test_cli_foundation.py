"""``progress-reset``: ``db upgrade``, ``seed``, refusals, and the command line itself.

Most tests run the CLI in this process through click's ``CliRunner``
(:func:`invoke`); a few run the installed console script in a subprocess, to
prove the entry point and a process started with nothing (or something wrong)
configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from models.logs import logger
from models.schema import Base, Course, CourseAssignment, User
from producer.cli import cli, main, parse
from producer.cli_parameters import MAX_ID

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "progress-reset"
CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/x"


def cli_argv() -> list[str]:
    """The installed console script, or the module when the package is not installed as a script."""
    if SCRIPT.exists():
        return [str(SCRIPT)]
    return [sys.executable, "-m", "producer.cli"]


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_argv(), *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Ran:
    """What :func:`invoke` returns: the fields of ``subprocess.CompletedProcess`` the tests read."""

    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str) -> Ran:
    """``progress-reset ARGS`` in this process, with this process's settings (set them with ``use_env``).

    The CLI points the project's logger at the runner's stderr; it is put back afterwards.
    """
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    return Ran(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """The environment without any project variable set, data under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"}}
    env["PROGRESS_RESET_DATA_DIR"] = str(tmp_path / "data")
    return env


def table_counts(url: str, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Rows per table of the schema (``skip`` the ones a test dropped)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {name: conn.scalar(select(func.count()).select_from(table))
                    for name, table in Base.metadata.tables.items() if name not in skip}
    finally:
        engine.dispose()


def assert_seed_json(stdout: str, learners: int) -> dict:
    payload = json.loads(stdout)
    assert {"organization_id", "admin_id", "learner_id", "course_ids"} <= payload.keys()
    for key in ("organization_id", "admin_id", "learner_id"):
        assert isinstance(payload[key], int) and payload[key] > 0
    assert isinstance(payload["course_ids"], list) and payload["course_ids"]
    assert all(isinstance(c, int) for c in payload["course_ids"])
    assert payload["admin_id"] != payload["learner_id"]
    return payload


def assert_seeded(url: str, payload: dict, learners: int) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            users = conn.scalar(select(func.count()).select_from(User)
                                .where(User.organization_id == payload["organization_id"]))
            assert users == learners + 1
            courses = conn.scalars(select(Course.id).where(Course.organization_id == payload["organization_id"]))
            assert sorted(courses) == sorted(payload["course_ids"])
            assigned = conn.scalar(select(func.count()).select_from(CourseAssignment)
                                   .where(CourseAssignment.course_id == payload["course_ids"][0]))
            assert assigned == learners
    finally:
        engine.dispose()


def assert_one_line_error(result: subprocess.CompletedProcess | Ran) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# -- the installed console script -----------------------------------------------------------------

def test_upgrade_and_seed_on_postgres(fresh_db, cli_env):
    url = fresh_db()
    env = {**cli_env, "DATABASE_URL": url}
    upgraded = run_cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    seeded = run_cli("seed", "--learners", "50", "--json", env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert_seeded(url, assert_seed_json(seeded.stdout, 50), 50)


def test_embedded_default_needs_nothing_set(cli_env):
    upgraded = run_cli("db", "upgrade", "--json", env=cli_env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"]
    seeded = run_cli("seed", "--learners", "20", "--json", env=cli_env)
    assert seeded.returncode == 0, seeded.stderr
    database = Path(cli_env["PROGRESS_RESET_DATA_DIR"]) / "progress_reset.db"
    assert database.exists()
    assert_seeded(f"sqlite:///{database}", assert_seed_json(seeded.stdout, 20), 20)


@pytest.mark.parametrize(
    "variable, value",
    [("DATABASE_URL", "mysql://root@127.0.0.1/training"), ("RESET_BATCH_SIZE", "lots"), ("NOTIFY_BACKEND", "pigeon"),
     ("RABBITMQ_QUEUE_TYPE", "mirrored")],
)
def test_bad_configuration_is_one_line_naming_the_variable(cli_env, variable, value):
    result = run_cli("seed", "--learners", "5", env={**cli_env, variable: value})
    line = assert_one_line_error(result)
    assert variable in line
    assert not (Path(cli_env["PROGRESS_RESET_DATA_DIR"]) / "progress_reset.db").exists()


@pytest.mark.parametrize("argv", [[], [sys.executable, "-m", "producer.cli"]], ids=["script", "module"])
def test_the_entry_points_answer_help_and_refuse_usage_errors_with_exit_2(cli_env, argv):
    argv = argv or cli_argv()
    helped = subprocess.run([*argv, "request", "--help"], env=cli_env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr
    assert "--idempotency-key" in helped.stdout and "Step 1" in helped.stdout
    wrong = subprocess.run([*argv, "reticulate"], env=cli_env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2
    assert assert_one_line_error(wrong).startswith("error: argument command: invalid choice: 'reticulate'")


# -- in this process ------------------------------------------------------------------------------

def test_upgrade_and_seed_on_a_sqlite_file(tmp_path, use_env):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    use_env(DATABASE_URL=url)
    assert invoke("db", "upgrade").returncode == 0
    seeded = invoke("seed", "--learners", "50", "--courses", "2", "--json")
    assert seeded.returncode == 0, seeded.stderr
    payload = assert_seed_json(seeded.stdout, 50)
    assert len(payload["course_ids"]) == 2
    assert_seeded(url, payload, 50)


def test_two_seeds_make_two_tenants(fresh_db, use_env):
    use_env(DATABASE_URL=fresh_db())
    first = json.loads(invoke("seed", "--learners", "5", "--json").stdout)
    second = json.loads(invoke("seed", "--learners", "5", "--json").stdout)
    assert first["organization_id"] != second["organization_id"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["seed", "--learners", "-1"], "--learners"),
        (["seed", "--learners", "0"], "--learners"),
        (["seed", "--learners", "abc"], "--learners"),
        (["seed", "--learners", "5", "--completed-ratio", "2"], "--completed-ratio"),
        (["seed", "--learners", "5", "--completed-ratio", "half"], "--completed-ratio"),
        (["seed", "--learners", "5", "--lessons", "0"], "--lessons"),
        (["seed"], "--learners"),
        (["reticulate"], "reticulate"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(fresh_db, use_env, args, says):
    url = fresh_db()
    use_env(DATABASE_URL=url)
    seeded = invoke("seed", "--learners", "3")
    assert seeded.returncode == 0, seeded.stderr
    before = table_counts(url)

    result = invoke(*args)

    assert result.returncode == 2
    assert says in assert_one_line_error(result)
    assert table_counts(url) == before


@pytest.mark.parametrize("args", [["db", "upgrade"], ["seed", "--learners", "5", "--json"]])
def test_unreachable_database_is_one_line(use_env, args):
    use_env(DATABASE_URL=CLOSED_PORT_URL)
    result = invoke(*args)
    line = assert_one_line_error(result)
    assert result.returncode == 3
    assert "database" in line
    assert result.stdout == ""


def test_refused_seed_leaves_a_postgres_database_unchanged(fresh_db, use_env):
    """A seed that fails inside its transaction (missing schema) leaves nothing behind."""
    url = fresh_db()
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("DROP TABLE certificates"))
    finally:
        engine.dispose()
    before = table_counts(url, skip=("certificates",))

    use_env(DATABASE_URL=url)
    result = invoke("seed", "--learners", "5")

    assert_one_line_error(result)
    assert result.returncode == 3
    assert table_counts(url, skip=("certificates",)) == before


# -- the command line, read without running anything ---------------------------------------------

def all_commands() -> list[tuple[str, click.Command]]:
    """Every command and group with its path, e.g. ``("campaign create", <Command create>)``."""
    found = []

    def walk(path: str, command: click.Command, ctx: click.Context) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                walk(f"{path} {name}".strip(), sub, click.Context(sub, parent=ctx, info_name=name))

    walk("", cli, click.Context(cli, info_name="progress-reset"))
    return found


def test_every_command_option_and_argument_has_help_text():
    commands = all_commands()
    assert {"seed", "request", "campaign run-due", "webhook redeliver", "dead-batches"} <= {p for p, _ in commands}
    missing = []
    for path, command in commands:
        if not (command.help or "").strip():
            missing.append(f"'{path or 'progress-reset'}'")
        for param in command.params:
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"'{path} {param.opts[0] if isinstance(param, click.Option) else param.name}'")
    assert not missing, f"no help text: {', '.join(missing)}"


@pytest.mark.parametrize("path", [p for p, _ in all_commands()])
def test_help_of_every_command(path):
    result = invoke(*path.split(), "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(f"Usage: progress-reset {path}".rstrip())


def test_help_lists_the_commands_in_their_order():
    listing = invoke("-h").stdout
    names = [line.split()[0] for line in listing.split("Commands:")[1].splitlines() if line.strip()]
    assert names[:4] == ["db", "seed", "request", "confirm"] and "webhook" in names


@pytest.mark.parametrize("argv, name", [
    (["confirm", "r", "--actor", "1", "--token"], "token"),
    (["request", "--actor", "1", "--course", "2", "--reason"], "reason"),
    (["request", "--actor", "1", "--course", "2", "--idempotency-key"], "idempotency_key"),
    (["api-key", "create", "--organization", "1", "--name"], "name"),
])
def test_a_value_may_start_with_a_dash(argv, name):
    """A token issued before tokens were drawn without a leading "-" still confirms; so does any such text."""
    option = argv.pop()
    assert parse([*argv, option, "-abc"]).params[name] == "-abc"
    assert parse([*argv, f"{option}=-abc"]).params[name] == "-abc"
    assert parse([*argv, option, "--not-an-option"]).params[name] == "--not-an-option"


@pytest.mark.parametrize("args, line", [
    (["confirm", "r", "--actor", "1", "--token", "--json"],
     "argument --token: expected one argument (see 'progress-reset confirm --help')"),
    (["confirm", "r", "--actor", "1", "--token"],
     "argument --token: expected one argument (see 'progress-reset confirm --help')"),
    (["confirm", "r", "--actor", "--json", "--token", "x"],
     "argument --actor: expected one argument (see 'progress-reset confirm --help')"),
    (["request", "--actor", "1", "--course", "2", "--reason", "-h"],
     "argument --reason: expected one argument (see 'progress-reset request --help')"),
    (["db", "upgrade", "--json=yes"], "argument --json: takes no value (see 'progress-reset db upgrade --help')"),
])
def test_an_option_is_not_taken_for_a_missing_value(args, line):
    result = invoke(*args)
    assert (result.returncode, assert_one_line_error(result)) == (2, f"error: {line}")


@pytest.mark.parametrize("args, line", [
    ([], "the following arguments are required: command (see 'progress-reset --help')"),
    (["campaign"], "the following arguments are required: command (see 'progress-reset campaign --help')"),
    (["reticulate"], "argument command: invalid choice: 'reticulate' (choose from 'db', 'seed', "),
    (["status"], "the following arguments are required: job_id (see 'progress-reset status --help')"),
    (["seed"], "the following arguments are required: --learners (see 'progress-reset seed --help')"),
    (["seed", "--learners", "5", "more"], "unrecognized arguments: more (see 'progress-reset seed --help')"),
    (["seed", "--learnr", "5"], "unrecognized arguments: --learnr (did you mean --learners?)"),
    (["seed", "--learners", "abc"], "argument --learners: expected a whole number, got 'abc'"),
    (["seed", "--learners", "0"], "argument --learners: must be at least 1, got 0"),
    (["seed", "--learners", "5", "--completed-ratio", "half"],
     "argument --completed-ratio: expected a number between 0 and 1, got 'half'"),
    (["seed", "--learners", "5", "--completed-ratio", "nan"],
     "argument --completed-ratio: must be between 0 and 1, got nan"),
    (["request", "--actor", "abc", "--course", "1"], "argument --actor: expected a numeric id, got 'abc'"),
    (["request", "--actor", "-3", "--course", "1"], "argument --actor: ids are positive, got -3"),
    (["request", "--actor", "1", "--course", str(MAX_ID + 1)],
     f"argument --course: ids are at most {MAX_ID}, got {MAX_ID + 1}"),
    (["campaign", "pause", "3000000000", "--actor", "1"], "argument campaign_id: ids are at most 2147483647"),
    (["campaign", "create", "--actor", "1", "--course", "1"], "one of the arguments --cron --every-months is required"),
    (["campaign", "create", "--actor", "1", "--course", "1", "--cron", "0 9 * * *", "--every-months", "1"],
     "argument --every-months: not allowed with argument --cron"),
    (["campaign", "create", "--actor", "1", "--course", "1", "--every-months", "x"],
     "argument --every-months: expected a whole number, got 'x'"),
    (["serve", "--port", "0"], "argument --port: a port is 1 to 65535, got 0"),
    (["serve", "--port", "http"], "argument --port: expected a port number, got 'http'"),
    (["health", "--timeout", "0"], "argument --timeout: must be more than 0 and at most 600 seconds, got 0.0"),
    (["health", "--timeout", "soon"], "argument --timeout: expected a number of seconds, got 'soon'"),
    (["audit", "export", "--organization", "1", "--from", "a", "--to", "b", "--format", "xml"],
     "argument --format: invalid choice: 'xml' (choose from 'jsonl', 'csv')"),
    (["webhook", "create", "--organization", "1", "--url", "u", "--event", "reset.started"],
     "argument --event: invalid choice: 'reset.started' (choose from 'reset.confirmed', "),
    (["jobs", "list", "--organization", "1", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
])
def test_usage_errors_are_one_line_with_exit_2(args, line):
    result = invoke(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert assert_one_line_error(result).startswith(f"error: {line}")


@pytest.mark.parametrize("at, line", [
    ("next tuesday", "argument --at: expected an ISO-8601 date-time (e.g. 2025-03-31T01:00:00Z), got 'next tuesday'"),
    ("9999-12-31T23:59-05:00", "argument --at: out of range (past the year 9999 in UTC), got '9999-12-31T23:59-05:00'"),
])
def test_a_refused_instant_keeps_exit_1(at, line):
    result = invoke("campaign", "run-due", "--at", at)
    assert result.returncode == 1
    assert assert_one_line_error(result).startswith(f"error: {line}")


def test_values_are_converted_and_bounds_are_inclusive():
    assert parse(["request", "--actor", "1", "--course", str(MAX_ID)]).params["course"] == MAX_ID
    assert parse(["seed", "--learners", "7", "--completed-ratio", "1"]).params == {
        "learners": 7, "lessons": 20, "courses": 1, "completed_ratio": 1.0, "random_seed": None, "as_json": False}
    at = parse(["campaign", "run-due", "--at", "2031-01-31T09:00"]).params["at"]
    assert at.isoformat() == "2031-01-31T09:00:00+00:00"
    assert parse(["campaign", "run-due", "--at", "2031-01-31T09:00+01:00"]).params["at"].hour == 8
    assert parse(["health", "--timeout", "600", "--queue", "resets", "--queue", "webhooks"]).params["queues"] == (
        "resets", "webhooks")
    assert parse(["webhook", "create", "--organization", "1", "--url", "u", "--event", "reset.failed",
                  "--event", "reset.succeeded"]).params["events"] == ("reset.failed", "reset.succeeded")


def test_main_returns_the_exit_status(capsys):
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        assert main(["seed", "--learners", "0"]) == 2
        assert main(["--help"]) == 0
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    out, err = capsys.readouterr()
    assert "Usage: progress-reset" in out and err.startswith("error: argument --learners")
