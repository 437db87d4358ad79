"""End to end with real worker processes on PostgreSQL + Redis (R4-R9 checked against SQL)."""

from __future__ import annotations

import time

import pytest
import redis

from models.db import dispose_engine, session_scope
from models.messaging import send_now
from models.seed import seed
from producer import resets
from tests.reset_checks import assert_reset_exact, snapshot, targeted

pytestmark = pytest.mark.e2e


def wait_for_job(job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            st = resets.status(session, job_id)
        if st["state"] in states:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {st['state']} after {timeout:.0f}s: {st}")
        time.sleep(0.2)


def queues_drained(redis_url: str, timeout: float = 60.0) -> None:
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while any(client.llen(q) for q in ("resets", "reset_batches", "notifications")):
        assert time.monotonic() < deadline, "queues not drained"
        time.sleep(0.2)
    client.close()


@pytest.fixture
def env(fresh_db, use_env, redis_url, tmp_path):
    yield use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, RESET_BATCH_SIZE="500",
                  NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"), NOTIFY_RATE_PER_SECOND="5000",
                  LOG_FORMAT="json")
    dispose_engine()


def test_course_wide_and_one_learner_resets_with_real_workers(env, celery_worker_proc):
    with session_scope() as session:
        org = seed(session, learners=5000, lessons=20, courses=2, completed_ratio=0.35, random_seed=11)
    course, other = org.course_ids
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
    celery_worker_proc(env, concurrency=2, name="e2e")

    with session_scope() as session:
        req = resets.request(session, org.admin_id, course, reason="procedure changed")
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)
    st = wait_for_job(job.job_id)
    assert st["state"] == "succeeded", st
    wanted = targeted(before, course)
    assert st["learners_total"] == st["learners_done"] == len(wanted) == req.summary["learners"]
    assert st["batches_total"] == st["batches_done"] >= 2
    assert st["cleared"]["certificates"] == req.summary["certificates"]
    with session_scope() as session:
        assert_reset_exact(session, before, job.job_id, course, wanted)

    # One learner in the other course: same path, one batch on the resets queue.
    learner = org.learner_id
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        req = resets.request(session, org.admin_id, other, learner_id=learner, reason="error in record")
    with session_scope() as session:
        one = resets.confirm(session, req.request_id, org.admin_id, req.token)
    st = wait_for_job(one.job_id, timeout=60)
    assert (st["state"], st["learners_done"], st["batches_total"]) == ("succeeded", 1, 1)
    with session_scope() as session:
        assert_reset_exact(session, before, one.job_id, other, {learner})


def test_every_message_delivered_twice_gives_the_same_outcome(env, celery_worker_proc, redis_url):
    with session_scope() as session:
        org = seed(session, learners=3000, lessons=10, courses=1, completed_ratio=0.5, random_seed=12)
    course = org.course_ids[0]
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        req = resets.request(session, org.admin_id, course)
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)
    # Before any worker runs: a second start.
    assert send_now("resets.start", [job.job_id])
    celery_worker_proc(env, concurrency=2, name="dup")
    deadline = time.monotonic() + 60
    while True:
        with session_scope() as session:
            st = resets.status(session, job.job_id)
        if st["batches_total"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(st["batches_total"]):  # two extra wake-ups per unit: each finds nothing left or a unit in turn
        assert send_now("resets.work", [])
        assert send_now("resets.work", [])
    send_now("resets.finalize", [job.job_id])
    send_now("resets.finalize", [job.job_id])
    st = wait_for_job(job.job_id)
    queues_drained(redis_url)
    with session_scope() as session:
        st = resets.status(session, job.job_id)
        assert st["state"] == "succeeded"
        assert st["batches_done"] == st["batches_total"]
        assert st["learners_done"] == st["learners_total"] == len(targeted(before, course))
        assert_reset_exact(session, before, job.job_id, course, targeted(before, course))
