"""A real Flower process against the test Redis and a real worker, read through Flower's HTTP API."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from models.db import dispose_engine, session_scope
from models.messaging import send_now
from models.queues import QUEUES
from models.seed import seed
from producer import resets
from tests.test_http_api import free_port
from tests.test_resets_e2e import wait_for_job
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


def confirm_course_reset(learners: int, reason: str, random_seed: int):
    """A new organization's course-wide reset, requested and confirmed: its job (queued)."""
    with session_scope() as session:
        org = seed(session, learners=learners, lessons=4, courses=1, completed_ratio=0.5, random_seed=random_seed)
    with session_scope() as session:
        req = resets.request(session, org.admin_id, org.course_ids[0], reason=reason)
    with session_scope() as session:
        return resets.confirm(session, req.request_id, org.admin_id, req.token)


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
    job = confirm_course_reset(learners=150, reason="incident 7", random_seed=3)

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


def queue_counts(page: str) -> dict[str, int]:
    """Queue name -> message count, as the Broker page's table shows them."""
    rows = re.findall(r'<tr id="([\w.]+)">\s*<td>\1</td>\s*<td>(\d+)</td>', page)
    return {name: int(count) for name, count in rows}


def wait_for(read, done, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value!r}"
        time.sleep(0.3)


def test_every_operator_page_answers_behind_basic_auth_and_the_broker_page_counts_each_queue(
        flower_env, start_flower, celery_worker_proc):
    worker = celery_worker_proc(flower_env, concurrency=1, name="pages")
    _flower, base = start_flower(flower_env)
    auth = (FLOWER_USER, FLOWER_PASSWORD)
    job = confirm_course_reset(learners=60, reason="pages", random_seed=5)

    with httpx.Client(base_url=base, timeout=30.0) as flower:
        tasks = wait_for(lambda: flower.get("/api/tasks", auth=auth).json(),
                         lambda found: any(t["name"] == "resets.start" and t.get("state") == "SUCCESS"
                                           for t in found.values()), 60, "resets.start in flower")
        start_id = next(i for i, t in tasks.items() if t["name"] == "resets.start")
        workers = wait_for(lambda: flower.get("/api/workers", params={"refresh": "true"}, auth=auth).json(),
                           lambda found: any(n.startswith("pages@") and "active_queues" in w
                                             for n, w in found.items()), 30, "the worker's queues in flower")
        worker_name = next(n for n in workers if n.startswith("pages@"))
        datatable = {"draw": "1", "start": "0", "length": "15", "search[value]": "", "order[0][column]": "7",
                     "columns[7][data]": "started", "order[0][dir]": "desc"}
        pages = {  # what a browser asks for when an operator opens each page (lists load as JSON)
            "workers": ("GET", "/", None), "workers list": ("GET", "/workers?json=1", None),
            "worker": ("GET", f"/worker/{worker_name}", None),
            "tasks": ("GET", "/tasks", None), "tasks list": ("POST", "/tasks/datatable", datatable),
            "task": ("GET", f"/task/{start_id}", None), "broker": ("GET", "/broker", None),
        }
        for what, (method, path, form) in pages.items():
            answer = flower.request(method, path, data=form, auth=auth)
            assert answer.status_code == 200, (what, answer.status_code, answer.text[:300])
            assert "workers.broker" not in answer.text, what  # the broker reads redis, not a class path
            for credentials in (None, (FLOWER_USER, "wrong")):
                refused = flower.request(method, path, data=form, auth=credentials)
                assert refused.status_code == 401, (what, credentials, refused.status_code)
        assert worker_name in flower.get(f"/worker/{worker_name}", auth=auth).text
        task_page = flower.get(f"/task/{start_id}", auth=auth).text
        assert start_id in task_page and "resets.start" in task_page
        assert "redis://127.0.0.1:6379/" in flower.get("/broker", auth=auth).text  # the page's caption

        # The Broker page names every queue with a count, and counts exactly what waits on each.
        assert wait_for_job(job.job_id, timeout=60)["state"] == "succeeded"
        wait_for(lambda: notifications_pending(job.job_id), lambda pending: pending == 0, 60, "notifications sent")
        assert_broker_page_counts_a_backlog(flower, auth, worker)


def notifications_pending(job_id: str) -> int:
    with session_scope() as session:
        return resets.status(session, job_id)["notifications"]["pending"]


def assert_broker_page_counts_a_backlog(flower: httpx.Client, auth, worker) -> None:
    """Flower already knows ``worker``'s queues: with the queues idle and the worker stopped, a known
    number of messages is published on some of them, and the Broker page shows each queue's count."""
    idle = {queue: 0 for queue in QUEUES}
    wait_for(lambda: queue_counts(flower.get("/broker", auth=auth).text), lambda counts: counts == idle, 60,
             "every queue listed and idle")
    worker.stop()
    backlog = {"notifications": 2, "maintenance": 3, "webhooks": 1}
    for _ in range(backlog["notifications"]):
        assert send_now("notifications.send", [str(uuid.uuid4())])
    for _ in range(backlog["maintenance"]):
        assert send_now("maintenance.sweep")
    assert send_now("webhooks.deliver", [1])
    expected = idle | backlog
    # RabbitMQ's management API refreshes its figures every few seconds; Redis answers at once.
    wait_for(lambda: queue_counts(flower.get("/broker", auth=auth).text), lambda counts: counts == expected, 30,
             f"the Broker page to show {expected}")


@pytest.fixture
def rabbitmq_with_management(tmp_path):
    """A RabbitMQ node of this test's own, with the management plugin the Broker page reads.

    The shared RabbitMQ runs without that plugin and its configuration is not ours to change;
    this node listens on free loopback ports, keeps its files in ``tmp_path`` and is stopped
    at the end. Skipped where RabbitMQ is not installed.
    """
    server = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin")
    if server is None:
        pytest.skip("rabbitmq-server is not installed")
    folder = tmp_path / "rabbitmq"
    folder.mkdir()
    amqp_port, api_port, dist_port = free_port(), free_port(), free_port()
    (folder / "enabled_plugins").write_text("[rabbitmq_management].\n")
    (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
                                          f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {api_port}\n")
    (folder / "rabbitmq-env.conf").write_text("")  # not the system node's name and ports
    env = {"PATH": "/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/bin", "HOME": str(folder), "LANG": "C.UTF-8",
           "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
           "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
           "RABBITMQ_NODENAME": f"flower-test-{os.getpid()}@localhost", "RABBITMQ_DIST_PORT": str(dist_port),
           "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"), "RABBITMQ_LOG_BASE": str(folder / "log")}
    with open(folder / "server.log", "wb") as log:
        node = subprocess.Popen([server], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{api_port}/api/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert node.poll() is None, (folder / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{api}overview", auth=("guest", "guest"), timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (folder / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield f"amqp://guest:guest@127.0.0.1:{amqp_port}//", api
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(10)


def test_on_rabbitmq_the_broker_page_counts_each_queue_from_the_management_api(
        fresh_db, use_env, tmp_path, rabbitmq_with_management, start_flower, celery_worker_proc):
    broker_url, api = rabbitmq_with_management
    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=broker_url, RABBITMQ_MANAGEMENT_URL=api.rstrip("/"),
                  NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"), LOG_FORMAT="json",
                  FLOWER_USER=FLOWER_USER, FLOWER_PASSWORD=FLOWER_PASSWORD)
    try:
        worker = celery_worker_proc(env, concurrency=1, name="rabbit")  # declares the five queues
        _flower, base = start_flower(env)
        auth = (FLOWER_USER, FLOWER_PASSWORD)
        with httpx.Client(base_url=base, timeout=30.0) as flower:
            wait_for(lambda: flower.get("/api/workers", params={"refresh": "true"}, auth=auth).json(),
                     lambda found: any(n.startswith("rabbit@") and "active_queues" in w for n, w in found.items()),
                     30, "the worker's queues in flower")
            page = flower.get("/broker", auth=auth)
            assert page.status_code == 200 and "amqp://guest:**@127.0.0.1:" in page.text, page.text[:300]
            assert flower.get("/broker").status_code == 401
            assert_broker_page_counts_a_backlog(flower, auth, worker)
    finally:
        dispose_engine()


def test_redis_urls_keep_their_scheme_and_take_the_hardened_transport(use_env, redis_url):
    """What Flower's Broker page and the worker banner read: ``redis://``, served by workers.broker."""
    from workers.app import app
    from workers.broker import Transport

    use_env(CELERY_BROKER_URL=redis_url)
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
        assert connection.as_uri() == redis_url
    # Registered too late (kombu already resolved redis:// to its own class), it says so.
    late = subprocess.run([sys.executable, "-c", "import kombu; kombu.Connection('redis://').transport; "
                           "import workers.app"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert late.returncode != 0
    assert "redis:// was resolved before workers.broker.register() ran" in late.stderr


def test_flower_refuses_a_malformed_management_url_in_one_line(flower_env, start_flower):
    env = {**flower_env, "RABBITMQ_MANAGEMENT_URL": "guest:secret@rabbitmq:15672/api"}
    process, _base = start_flower(env, wait=False)
    assert process.wait(30) not in (None, 0)
    log = process.log_text()
    assert "error: configuration: RABBITMQ_MANAGEMENT_URL must be an http:// or https:// URL" in log, log
    assert "Traceback" not in log and "secret" not in log
