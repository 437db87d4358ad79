"""Worker logs honour the operator's level (issue 13, item 10): real workers, a real reset."""

from __future__ import annotations

import json
import math
import time

import pytest

from models.db import dispose_engine, session_scope
from models.seed import seed
from models.settings import get_settings
from producer import resets
from tasks.ratelimit import notification_group_size
from workers.processes import start_celery
from tests.test_resets_e2e import wait_for_job

pytestmark = pytest.mark.e2e

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def env(fresh_db, use_env, redis_url, tmp_path):
    yield use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, RESET_BATCH_SIZE="100",
                  NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"), NOTIFY_RATE_PER_SECOND="5000",
                  LOG_FORMAT="json")
    dispose_engine()


def _reset_with_worker(env, tmp_path, level: str) -> tuple[list[dict], int]:
    """Run one course-wide reset with a worker at ``level``; its project log lines and notifications sent."""
    with session_scope() as session:
        org = seed(session, learners=400, lessons=2, courses=1, random_seed=31)
    log_path = tmp_path / f"worker-{level}.log"
    worker = start_celery(["worker", "-Q", "resets,reset_batches,notifications,maintenance", "-c", "2",
                           "-n", f"logs-{level}@%h", "--without-mingle", "--without-gossip", "-l", level],
                          env=env, log_path=log_path, name=f"logs-{level}", cwd=REPO_ROOT)
    try:
        with session_scope() as session:
            req = resets.request(session, org.admin_id, org.course_ids[0], reason="log levels")
            job = resets.confirm(session, req.request_id, org.admin_id, req.token)
        wait_for_job(job.job_id, timeout=90)
        deadline = time.monotonic() + 60
        while True:
            with session_scope() as session:
                notifications = resets.status(session, job.job_id)["notifications"]
            if not notifications["pending"]:
                break
            assert time.monotonic() < deadline, notifications
            time.sleep(0.2)
    finally:
        worker.stop()
    lines = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines, notifications["sent"]


def test_item10_a_worker_at_warning_writes_no_info_lines(env, tmp_path):
    lines, sent = _reset_with_worker(env, tmp_path, "WARNING")
    assert sent > 100
    assert not [line for line in lines if line.get("level") in ("info", "debug")], lines[:5]


def test_item10_at_info_one_line_per_send_run_not_per_notification(env, tmp_path):
    lines, sent = _reset_with_worker(env, tmp_path, "INFO")
    events = [line.get("event") for line in lines]
    assert "notification.sent" not in events  # per notification: debug only
    groups = [line for line in lines if line.get("event") == "notification.group"]
    assert groups and sum(group["sent"] for group in groups) == sent
    # One line per group the rate limiter let through (rate x 0.2 s), not one per notification.
    size = notification_group_size(get_settings())
    assert size > 1 and len(groups) <= 2 * math.ceil(sent / size), (len(groups), sent, size)
