"""``progress-reset health``: database, broker, and a canary actually consumed on every queue."""

from __future__ import annotations

import json

import pytest
import redis

from models.db import dispose_engine
from models.canary import reply_store
from models.queues import QUEUES, canary_task_name
from tasks.health import record_canary
from workers.health import judge_queue
from tests.test_http_api import free_port, run_cli

ALL_BUT_NOTIFICATIONS = "resets,reset_batches,webhooks,maintenance"


# --- plain functions ------------------------------------------------------------------------------

def test_one_canary_per_queue_routed_by_the_worker_configuration():
    from workers.app import app
    from workers.config import TASK_ROUTES

    assert {route["queue"] for route in TASK_ROUTES.values()} == set(QUEUES)
    for queue in QUEUES:
        assert TASK_ROUTES[canary_task_name(queue)] == {"queue": queue}
        assert canary_task_name(queue) in app.tasks


def test_judging_a_queue_from_its_reply_and_the_lengths_seen():
    ok = judge_queue("resets", {"worker": "w@h", "database": "ok"}, 0.2, [0, 1, 0], 5)
    assert (ok.ok, ok.state, ok.worker) == (True, "ok", "w@h")
    # Not consumed in time, but the backlog went down: busy, not broken.
    busy = judge_queue("reset_batches", None, 5, [400, 399, 350, 300], 5)
    assert (busy.ok, busy.state, busy.waiting) == (True, "backlogged", 300)
    stuck = judge_queue("notifications", None, 5, [12, 13, 13], 5)
    assert (stuck.ok, stuck.state) == (False, "not_consumed")
    assert "notifications" in stuck.detail and "13 messages" in stuck.detail
    unknown = judge_queue("maintenance", None, 5, [None, None], 5)
    assert (unknown.ok, unknown.state) == (False, "not_consumed")
    no_db = judge_queue("resets", {"worker": "w@h", "database": "unreachable: OperationalError"}, 0.1, [0], 5)
    assert (no_db.ok, no_db.state) == (False, "database_unreachable")


def test_canary_replies_round_trip_through_redis_and_files(use_env, redis_url, tmp_path):
    from models.settings import get_settings

    use_env(CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url)
    record_canary("resets", "ab" * 8, "w@h")
    store = reply_store(get_settings())
    assert store.get_many("ab" * 8, ["resets", "notifications"])["resets"]["worker"] == "w@h"
    store.discard("ab" * 8, ["resets"])
    assert store.get_many("ab" * 8, ["resets"]) == {}
    store.close()

    use_env(CELERY_BROKER_URL=None, REDIS_URL=None, PROGRESS_RESET_DATA_DIR=str(tmp_path))
    record_canary("maintenance", "cd" * 8, "w@h")
    files = reply_store(get_settings())
    assert files.get_many("cd" * 8, ["maintenance"])["maintenance"]["worker"] == "w@h"
    with pytest.raises(ValueError):
        record_canary("maintenance", "../../etc", "w@h")  # a nonce is hex, never a path
    dispose_engine()


# --- the command against real workers --------------------------------------------------------------------

@pytest.fixture
def health_env(fresh_db, use_env, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url, LOG_FORMAT="json")
    yield env
    dispose_engine()


@pytest.mark.e2e
def test_health_passes_with_every_queue_consumed_and_names_the_queue_whose_worker_stopped(health_env,
                                                                                        celery_worker_proc):
    celery_worker_proc(health_env, queues=ALL_BUT_NOTIFICATIONS, concurrency=1, name="main")
    notifier = celery_worker_proc(health_env, queues="notifications", concurrency=1, name="notify")

    healthy = run_cli(health_env, "health", "--json", "--timeout", "15")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    report = json.loads(healthy.stdout)
    assert report["ok"] and report["database"]["ok"] and report["broker"]["ok"]
    assert {q: r["state"] for q, r in report["queues"].items()} == dict.fromkeys(QUEUES, "ok")
    assert report["queues"]["notifications"]["worker"].startswith("notify@")
    assert report["queues"]["resets"]["worker"].startswith("main@")

    notifier.stop()
    assert not notifier.alive()
    sick = run_cli(health_env, "health", "--timeout", "3")
    assert sick.returncode == 1, sick.stdout + sick.stderr
    errors = [line for line in sick.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: unhealthy: queue notifications:"), sick.stderr
    lines = {line.split()[0]: line for line in sick.stdout.splitlines() if line.strip()}
    assert "FAIL" in lines["notifications"]
    for queue in ALL_BUT_NOTIFICATIONS.split(","):
        assert lines[queue].split()[1] == "ok", sick.stdout
    assert lines["UNHEALTHY"]

    as_json = run_cli(health_env, "health", "--json", "--timeout", "2", "--queue", "notifications")
    assert as_json.returncode == 1
    body = json.loads(as_json.stdout)
    assert list(body["queues"]) == ["notifications"]
    assert body["queues"]["notifications"]["state"] == "not_consumed"
    assert body["problems"] and "notifications" in body["problems"][0]


@pytest.mark.e2e
def test_health_fails_fast_naming_the_broker_when_it_is_down(health_env):
    env = {**health_env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_URL": ""}
    result = run_cli(env, "health", "--timeout", "5", timeout=30)
    assert result.returncode == 1
    assert "broker" in result.stderr and "unreachable" in result.stderr
    assert "database" not in result.stderr  # the database is fine and not blamed


@pytest.mark.e2e
def test_health_on_the_embedded_filesystem_broker(use_env, tmp_path, celery_worker_proc):
    """No Redis: canaries reply through files in the shared data directory."""
    env = use_env(DATABASE_URL=None, CELERY_BROKER_URL=None, REDIS_URL=None,
                  PROGRESS_RESET_DATA_DIR=str(tmp_path / "data"), LOG_FORMAT="json")
    upgraded = run_cli(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    celery_worker_proc(env, concurrency=1, name="embedded")
    result = run_cli(env, "health", "--json", "--timeout", "15")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["database"]["detail"].startswith("SQLite")
    assert all(q["state"] == "ok" for q in report["queues"].values()), report
    assert list((tmp_path / "data" / "health").glob("*.json")) == []  # replies are cleaned up
    dispose_engine()
