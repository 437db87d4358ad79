"""A real Flower process against the test Redis and a real worker, read through Flower's HTTP API."""

from __future__ import annotations

import ast
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from models.db import dispose_engine, session_scope
from models.seed import seed
from producer import resets
from tests.test_http_api import free_port
from workers.processes import start_celery

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOWER_USER, FLOWER_PASSWORD = "ops", "correct horse battery staple"


@pytest.fixture
def flower_env(fresh_db, use_env, redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url, LOG_FORMAT="json",
                  RESET_BATCH_SIZE="40", NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"),
                  NOTIFY_RATE_PER_SECOND="5000", FLOWER_USER=FLOWER_USER, FLOWER_PASSWORD=FLOWER_PASSWORD)
    yield env
    dispose_engine()


@pytest.fixture
def start_flower(tmp_path, request):
    started = []

    def start(env: dict[str, str], address: str = "127.0.0.1", wait: bool = True):
        port = free_port()
        process = start_celery(["flower", "--conf=workers/flower_config.py", f"--port={port}",
                                f"--address={address}"],
                               env=env, log_path=tmp_path / f"flower-{len(started)}.log", name="flower",
                               cwd=REPO_ROOT)
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while wait:
            assert process.alive(), f"flower exited with {process.popen.returncode}:\n{process.log_tail()}"
            try:
                if httpx.get(f"{base}/healthcheck", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"flower did not answer:\n{process.log_tail()}"
            time.sleep(0.1)
        return process, base

    yield start
    for process in started:
        process.stop(timeout=5)
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for process in started:
            print(f"--- flower log {process.log_path} ---\n{process.log_tail(60)}")


def is_id(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    try:
        uuid.UUID(str(value))
        return True
    except ValueError:
        return False


def test_flower_shows_the_worker_and_id_only_reset_tasks_behind_basic_auth(flower_env, start_flower,
                                                                           celery_worker_proc):
    worker = celery_worker_proc(flower_env, concurrency=2, name="flw")
    _flower, base = start_flower(flower_env)
    auth = (FLOWER_USER, FLOWER_PASSWORD)

    with session_scope() as session:
        org = seed(session, learners=150, lessons=4, courses=1, completed_ratio=0.5, random_seed=3)
    with session_scope() as session:
        req = resets.request(session, org.admin_id, org.course_ids[0], reason="incident 7")
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)

    with httpx.Client(base_url=base, timeout=30.0) as flower:
        # Basic auth: a wrong password and no credentials are refused.
        assert flower.get("/api/workers", auth=(FLOWER_USER, "wrong")).status_code == 401
        assert flower.get("/api/tasks").status_code == 401
        assert flower.get("/", auth=(FLOWER_USER, "wrong")).status_code == 401

        deadline = time.monotonic() + 60
        while True:
            tasks = flower.get("/api/tasks", auth=auth).json()
            names = {t["name"] for t in tasks.values() if t.get("state") == "SUCCESS"}
            # The start plans the job; resets.work wake-ups run its batches and the last one finalizes.
            if {"resets.start", "resets.work"} <= names:
                break
            assert time.monotonic() < deadline, f"reset tasks not all seen by flower: {sorted(names)}"
            time.sleep(0.3)

        reset_tasks = [t for t in tasks.values() if t["name"].startswith("resets.") and t.get("state") == "SUCCESS"]
        for task in reset_tasks:
            args = ast.literal_eval(task["args"])
            if task["name"] == "resets.work":
                assert args == (), task  # a wake-up carries nothing: the database picks the unit
            else:
                assert args and all(is_id(a) for a in args), task
                assert args[0] == job.job_id, task
            assert ast.literal_eval(task["kwargs"] or "{}") == {}, task
            assert task["worker"].startswith("flw@")
        shown = repr(reset_tasks)
        assert "incident 7" not in shown and "@example" not in shown  # no reason text, no e-mails

        workers = flower.get("/api/workers", params={"refresh": "true"}, auth=auth).json()
        name = next(n for n in workers if n.startswith("flw@"))
        queues = {q["name"] for q in workers[name]["active_queues"]}
        assert queues == {"resets", "reset_batches", "notifications", "webhooks", "maintenance"}
        assert {"resets.work", "resets.run_single"} <= set(workers[name]["registered"])

        # Flower's own Prometheus metrics are there too (Flower serves them without auth).
        metrics = flower.get("/metrics")
        assert metrics.status_code == 200
        families = {f.name for f in text_string_to_metric_families(metrics.text)}
        assert "flower_events" in families
    assert worker.alive()
    with session_scope() as session:
        assert resets.status(session, job.job_id)["state"] == "succeeded"


def test_flower_refuses_to_listen_beyond_loopback_without_credentials(flower_env, start_flower):
    env = {**flower_env, "FLOWER_USER": "", "FLOWER_PASSWORD": ""}
    process, _base = start_flower(env, address="0.0.0.0", wait=False)
    assert process.wait(30) not in (None, 0)
    assert "refusing to listen on 0.0.0.0 without authentication" in process.log_text()


def test_item9_flower_without_credentials_on_loopback_refuses_every_page(flower_env, start_flower,
                                                                         celery_worker_proc):
    env = {**flower_env, "FLOWER_USER": "", "FLOWER_PASSWORD": ""}
    celery_worker_proc(env, queues="resets", concurrency=1, name="locked")
    _process, base = start_flower(env)
    with httpx.Client(base_url=base, timeout=30.0) as flower:
        for path in ("/", "/workers", "/tasks", "/broker", "/tasks/datatable", "/api/workers", "/api/tasks",
                     "/api/task/info/00000000-0000-0000-0000-000000000000"):
            response = flower.get(path, follow_redirects=True)
            assert response.status_code == 401, (path, response.status_code, response.text[:200])
            assert "redis://" not in response.text
        # The worker's page (it shows the broker URL) is refused all the same.
        worker_name = f"locked@{socket.gethostname()}"
        page = flower.get(f"/worker/{worker_name}")
        assert page.status_code == 401 and "redis://" not in page.text
        # A guess at the user and password of the lock is no way in either.
        assert flower.get("/workers", auth=("locked", "")).status_code == 401
        # The health check and Flower's own metrics stay open (no broker URL, no task arguments).
        assert flower.get("/healthcheck").status_code == 200
        assert flower.get("/metrics").status_code == 200
