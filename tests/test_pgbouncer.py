"""Behind PgBouncer in transaction pooling mode: a reset, a cancel and the notification send.

A real PgBouncer (``tests.services.start_pgbouncer``) sits in front of the test database with
three server connections handed out in turn (``server_round_robin``), as on a busy pooler: a
client's consecutive transactions land on different server connections. The producer calls of
this process and real worker processes all connect through it. With
``DATABASE_PREPARED_STATEMENTS=false`` the path works; without it, the same path fails with
psycopg's prepared statements (prepared after five executions on one server connection,
unknown on the next), so the setting is what makes it work.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from models.db import dispose_engine, get_engine, make_engine, session_scope
from models.schema import ResetBatch
from models.seed import seed
from producer import resets
from producer.metrics import ResetSystemCollector
from tests import fault_support as fs
from tests.services import ServicesUnavailable, ensure_pgbouncer, start_pgbouncer
from tests.test_http_api import run_cli

pytestmark = pytest.mark.e2e

PREPARED_STATEMENT_ERROR = 'prepared statement "_pg3_'


@pytest.fixture
def bouncer(admin_db_url, tmp_path):
    try:
        ensure_pgbouncer()
    except ServicesUnavailable as exc:
        pytest.fail(f"the PgBouncer tests need pgbouncer: {exc}", pytrace=False)
    started = start_pgbouncer(admin_db_url, tmp_path / "pgbouncer", pool_mode="transaction", pool_size=3)
    yield started
    dispose_engine()  # before the pooler goes: this process's connections go through it
    started.stop()


@pytest.fixture
def through(bouncer, fresh_db, use_env, redis_url, tmp_path):
    """Factory: ``through(prepared)`` -> (environment through PgBouncer, direct URL, organization)."""

    def make(prepared_statements: bool):
        direct = fresh_db()
        notifications = tmp_path / f"notifications-{prepared_statements}.jsonl"
        env = use_env(DATABASE_URL=bouncer.url_for(direct), CELERY_BROKER_URL=redis_url, RESET_BATCH_SIZE="25",
                      RESET_PURGE_MIN_ROWS="0", NOTIFY_CONSOLE_PATH=str(notifications),
                      NOTIFY_RATE_PER_SECOND="5000", DATABASE_PREPARED_STATEMENTS=str(prepared_statements).lower(),
                      LOG_FORMAT="json")
        engine = make_engine(direct, poolclass=NullPool)
        with Session(engine) as session, session.begin():
            org = seed(session, learners=600, lessons=4, courses=2, completed_ratio=0.4, random_seed=20)
        engine.dispose()
        fs.install_batch_slowdown(direct, 0.0)
        return env, direct, org, notifications

    return make


def _confirm(org, course) -> tuple[str, dict]:
    with session_scope() as session:
        req = resets.request(session, org.admin_id, course, reason="behind pgbouncer")
        job_id = resets.confirm(session, req.request_id, org.admin_id, req.token).job_id
    return job_id, req.summary


def _wait(job_id: str, done, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            st = resets.status(session, job_id)
        if done(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def reset_cancel_and_notify(env, direct, org, notifications, start_worker) -> None:
    """A course reset to the end with its notifications sent, then a course reset cancelled mid-way."""
    worker = start_worker(env, concurrency=2, name="pooled")
    first, second = org.course_ids
    job_id, summary = _confirm(org, first)
    st = _wait(job_id, lambda s: s["state"] in ("succeeded", "failed", "cancelled"))
    assert st["state"] == "succeeded" and st["learners_done"] == summary["learners"] > 0, st
    st = _wait(job_id, lambda s: not s["notifications"]["pending"], timeout=60)
    assert st["notifications"]["sent"] == summary["learners_to_notify"] > 0, st
    assert len(notifications.read_text().splitlines()) == summary["learners_to_notify"]

    fs.set_batch_slowdown(direct, 0.3)  # batches stay in flight, so the cancel lands in a running job
    job_id, _summary = _confirm(org, second)

    def in_flight(s):
        with session_scope() as session:
            running = session.scalar(select(func.count()).select_from(ResetBatch).where(
                ResetBatch.job_id == uuid.UUID(job_id), ResetBatch.state == "running"))
        return s["batches_done"] >= 1 and running

    _wait(job_id, in_flight, timeout=60)
    with session_scope() as session:
        assert resets.cancel(session, job_id, org.admin_id)["state"] == "cancelling"
    st = _wait(job_id, lambda s: s["state"] != "cancelling", timeout=60)
    assert st["state"] == "cancelled" and 0 < st["learners_done"] < st["learners_total"], st
    assert PREPARED_STATEMENT_ERROR not in worker.log_text()


def test_a_reset_a_cancel_and_notifications_work_through_pgbouncer_in_transaction_mode(
        through, celery_worker_proc, bouncer):
    env, direct, org, notifications = through(prepared_statements=False)
    assert "pool_mode = transaction" in (bouncer.folder / "pgbouncer.ini").read_text()
    reset_cancel_and_notify(env, direct, org, notifications, celery_worker_proc)
    # The other transaction-scoped features: a server-side cursor (the audit export), SET LOCAL (metrics).
    export = run_cli(env, "audit", "export", "--organization", str(org.organization_id), "--from", "2000-01-01",
                     "--to", "2100-01-01")
    assert export.returncode == 0, export.stderr
    assert [json.loads(line)["action"] for line in export.stdout.splitlines()].count("reset.confirmed") == 2
    database_up = [m for m in ResetSystemCollector().collect() if m.name == "progress_reset_database_up"]
    assert database_up[0].samples[0].value == 1


def test_without_the_setting_the_same_path_fails_on_prepared_statements(through, celery_worker_proc):
    env, direct, org, notifications = through(prepared_statements=True)
    workers = []

    def start_worker(*args, **kwargs):
        workers.append(celery_worker_proc(*args, **kwargs))
        return workers[-1]

    with pytest.raises(Exception) as failed:
        reset_cancel_and_notify(env, direct, org, notifications, start_worker)
    seen = str(failed.value) + "".join(worker.log_text() for worker in workers)
    assert PREPARED_STATEMENT_ERROR in seen, seen[-3000:]


def test_each_process_pool_and_prepared_statements_follow_the_settings(db_url, use_env):
    use_env(DATABASE_URL=db_url, DATABASE_POOL_SIZE="2", DATABASE_MAX_OVERFLOW="0",
            DATABASE_PREPARED_STATEMENTS="false")
    engine = get_engine()
    assert (engine.pool.size(), engine.pool._max_overflow) == (2, 0)
    with engine.connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None
    use_env(DATABASE_POOL_SIZE=None, DATABASE_MAX_OVERFLOW=None, DATABASE_PREPARED_STATEMENTS=None)
    engine = get_engine()
    assert (engine.pool.size(), engine.pool._max_overflow) == (5, 5)
    with engine.connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold == 5  # psycopg's default
    dispose_engine()
