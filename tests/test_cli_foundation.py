"""The real ``progress-reset`` console script: ``db upgrade``, ``seed``, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from models.schema import Base, Course, CourseAssignment, User

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


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_upgrade_and_seed_on_postgres(fresh_db, cli_env):
    url = fresh_db()
    env = {**cli_env, "DATABASE_URL": url}
    upgraded = run_cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    seeded = run_cli("seed", "--learners", "50", "--json", env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert_seeded(url, assert_seed_json(seeded.stdout, 50), 50)


def test_upgrade_and_seed_on_a_sqlite_file(tmp_path, cli_env):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**cli_env, "DATABASE_URL": url}
    assert run_cli("db", "upgrade", env=env).returncode == 0
    seeded = run_cli("seed", "--learners", "50", "--courses", "2", "--json", env=env)
    assert seeded.returncode == 0, seeded.stderr
    payload = assert_seed_json(seeded.stdout, 50)
    assert len(payload["course_ids"]) == 2
    assert_seeded(url, payload, 50)


def test_embedded_default_needs_nothing_set(cli_env):
    upgraded = run_cli("db", "upgrade", "--json", env=cli_env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"]
    seeded = run_cli("seed", "--learners", "20", "--json", env=cli_env)
    assert seeded.returncode == 0, seeded.stderr
    database = Path(cli_env["PROGRESS_RESET_DATA_DIR"]) / "progress_reset.db"
    assert database.exists()
    assert_seeded(f"sqlite:///{database}", assert_seed_json(seeded.stdout, 20), 20)


def test_two_seeds_make_two_tenants(fresh_db, cli_env):
    env = {**cli_env, "DATABASE_URL": fresh_db()}
    first = json.loads(run_cli("seed", "--learners", "5", "--json", env=env).stdout)
    second = json.loads(run_cli("seed", "--learners", "5", "--json", env=env).stdout)
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
def test_bad_input_is_refused_in_one_line_and_changes_nothing(fresh_db, cli_env, args, says):
    url = fresh_db()
    env = {**cli_env, "DATABASE_URL": url}
    seeded = run_cli("seed", "--learners", "3", env=env)
    assert seeded.returncode == 0, seeded.stderr
    before = table_counts(url)

    line = assert_one_line_error(run_cli(*args, env=env))

    assert says in line
    assert table_counts(url) == before


@pytest.mark.parametrize("args", [["db", "upgrade"], ["seed", "--learners", "5", "--json"]])
def test_unreachable_database_is_one_line(cli_env, args):
    result = run_cli(*args, env={**cli_env, "DATABASE_URL": CLOSED_PORT_URL}, timeout=60)
    line = assert_one_line_error(result)
    assert "database" in line
    assert result.stdout == ""


@pytest.mark.parametrize(
    "variable, value",
    [("DATABASE_URL", "mysql://root@127.0.0.1/training"), ("RESET_BATCH_SIZE", "lots"), ("NOTIFY_BACKEND", "pigeon")],
)
def test_bad_configuration_is_one_line_naming_the_variable(cli_env, variable, value):
    result = run_cli("seed", "--learners", "5", env={**cli_env, variable: value})
    line = assert_one_line_error(result)
    assert variable in line
    assert not (Path(cli_env["PROGRESS_RESET_DATA_DIR"]) / "progress_reset.db").exists()


def test_refused_seed_leaves_a_postgres_database_unchanged(fresh_db, cli_env):
    """A seed that fails inside its transaction (missing schema) leaves nothing behind."""
    url = fresh_db()
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("DROP TABLE certificates"))
    finally:
        engine.dispose()
    before = table_counts(url, skip=("certificates",))

    result = run_cli("seed", "--learners", "5", env={**cli_env, "DATABASE_URL": url})

    assert_one_line_error(result)
    assert table_counts(url, skip=("certificates",)) == before
