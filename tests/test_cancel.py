"""The cancel path (issue 13, items 3, 11 and 12): cancelling until the work in flight ends, the true
count in the audit trail, clean-up after a worker died holding a batch, and no deadlock with purge steps.

The plain-function tests run on PostgreSQL and on SQLite (``pipeline_db``); the others need
PostgreSQL: real workers on Redis, and row locks between concurrent transactions."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from models.components import RESET_COMPONENTS
from models.db import dispose_engine, session_scope
from models.schema import AuditEvent, CourseAssignment, ResetBatch
from models.seed import seed
from models.states import JobState
from models.times import utcnow
from producer import resets
from tasks import maintenance
from tasks.resets.finalize import finalize_job
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.purge import purge_step
from tasks.resets.start import start_job
from tests import fault_support as fs
from tests.db_backends import pipeline_db  # noqa: F401 - the fixture


def _confirm(session, org, course) -> str:
    req = resets.request(session, org.admin_id, course, reason="cancel path")
    return resets.confirm(session, req.request_id, org.admin_id, req.token).job_id


def _reset_learners(session, job_id: str, course: int) -> set[int]:
    return set(session.scalars(select(CourseAssignment.user_id).where(
        CourseAssignment.course_id == course, CourseAssignment.last_reset_job_id == uuid.UUID(job_id))))


def _earlier_attempt_rows(session, course: int, learners: set[int]) -> int:
    """Rows of these learners in the course from before their current attempt (must be none)."""
    a = CourseAssignment.__table__.c
    left = 0
    for component in RESET_COMPONENTS:
        t = component.table
        left += session.scalar(select(func.count()).select_from(t.join(
            CourseAssignment.__table__, (a.course_id == t.c.course_id) & (a.user_id == t.c.user_id)))
            .where(t.c.course_id == course, t.c.user_id.in_(learners), t.c.attempt < a.attempt)) or 0
    return left


def _final_audit(session, job_id: str) -> AuditEvent:
    return session.scalars(select(AuditEvent).where(AuditEvent.job_id == uuid.UUID(job_id))
                           .order_by(AuditEvent.id.desc())).first()


def test_item11_a_cancelled_job_whose_worker_died_holding_a_batch_is_cleaned_up(pipeline_db):
    org = seed(pipeline_db, learners=120, lessons=4, courses=1, random_seed=21)
    course = org.course_ids[0]
    job_id = _confirm(pipeline_db, org, course)
    start = start_job(pipeline_db, job_id, batch_size=20)
    held, done = start.batch_nos[0], start.batch_nos[1]
    # A worker claimed `held` and died (its work rolled back with it); `done` finished.
    assert claim_batch(pipeline_db, job_id, held, 5, lease_seconds=30).runnable
    claim_batch(pipeline_db, job_id, done, 5, 30)
    learners = reset_batch(pipeline_db, job_id, done).learners
    assert resets.cancel(pipeline_db, job_id, org.admin_id)["state"] == "cancelling"
    # A batch that finds its job cancelling hands on to the clean-up.
    third = start.batch_nos[2]
    claim_batch(pipeline_db, job_id, third, 5, 30)
    assert reset_batch(pipeline_db, job_id, third).job_state == JobState.CANCELLING
    # While the dead worker's lease lasts, the clean-up waits for it ...
    assert not finalize_job(pipeline_db, job_id).finished
    # ... and once it ran out, the sweep sends the finalize again and the clean-up completes.
    later = utcnow() + timedelta(seconds=61)  # past the lease and PUBLISH_STALE_SECONDS
    assert maintenance.sweep(pipeline_db, now=later).finalizes_published >= 1
    assert finalize_job(pipeline_db, job_id, now=later).finished
    st = resets.status(pipeline_db, job_id)
    assert (st["state"], st["learners_done"]) == ("cancelled", learners)
    assert pipeline_db.get(ResetBatch, (uuid.UUID(job_id), held)).state == "cancelled"
    reset_ids = _reset_learners(pipeline_db, job_id, course)
    assert len(reset_ids) == learners and _earlier_attempt_rows(pipeline_db, course, reset_ids) == 0
    final = _final_audit(pipeline_db, job_id)
    assert (final.action, final.learner_count) == ("reset.cancelled", learners)


def test_a_queued_job_is_cancelled_at_once(pipeline_db):
    org = seed(pipeline_db, learners=30, lessons=2, courses=1, random_seed=22)
    job_id = _confirm(pipeline_db, org, org.course_ids[0])
    st = resets.cancel(pipeline_db, job_id, org.admin_id)
    assert st["state"] == "cancelled" and st["finished_at"] is not None
    assert not start_job(pipeline_db, job_id, batch_size=10).started
    assert _final_audit(pipeline_db, job_id).action == "reset.cancelled"


@pytest.fixture
def env(fresh_db, use_env, redis_url, tmp_path):
    url = fresh_db()
    yield use_env(DATABASE_URL=url, CELERY_BROKER_URL=redis_url, RESET_BATCH_SIZE="25", RESET_PURGE_MIN_ROWS="0",
                  NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"), NOTIFY_RATE_PER_SECOND="5000",
                  LOG_FORMAT="json") | {"url": url}
    dispose_engine()


def test_item3_the_final_audit_event_counts_every_learner_the_cancelled_job_reset(env, celery_worker_proc):
    # PostgreSQL only: real workers on Redis (the SQLite path end to end is the demo's test).
    with session_scope() as session:
        org = seed(session, learners=600, lessons=4, courses=1, random_seed=23)
    course = org.course_ids[0]
    fs.install_batch_slowdown(env["url"], 0.3)  # batches stay in flight a while
    worker_env = {k: v for k, v in env.items() if k != "url"}
    celery_worker_proc(worker_env, queues="resets,reset_batches,maintenance", concurrency=2, name="cancel")
    with session_scope() as session:
        job_id = _confirm(session, org, course)
    deadline = time.monotonic() + 60
    while True:
        with session_scope() as session:
            st = resets.status(session, job_id)
            running = session.scalar(select(func.count()).select_from(ResetBatch).where(
                ResetBatch.job_id == uuid.UUID(job_id), ResetBatch.state == "running"))
        if st["batches_done"] >= 2 and running:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.02)
    with session_scope() as session:
        st = resets.cancel(session, job_id, org.admin_id)
    # A batch is in flight: the job reads cancelling, not finished.
    assert st["state"] == "cancelling" and st["finished_at"] is None
    deadline = time.monotonic() + 60
    while st["state"] != "cancelled":
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
        with session_scope() as session:
            st = resets.status(session, job_id)
    with session_scope() as session:
        reset_ids = _reset_learners(session, job_id, course)
        final = _final_audit(session, job_id)
        assert (final.action, final.learner_count) == ("reset.cancelled", len(reset_ids))
        assert st["learners_done"] == len(reset_ids) > 0
        assert _earlier_attempt_rows(session, course, reset_ids) == 0
        total = session.scalar(select(func.count()).select_from(CourseAssignment)
                               .where(CourseAssignment.course_id == course, CourseAssignment.status != "not_started"))
        assert total > 0  # learners the job never reached kept their progress


def test_item12_cancel_during_the_purge_never_deadlocks(env):
    # PostgreSQL only: row locks between concurrent transactions (SQLite serialises writers).
    with session_scope() as session:
        org = seed(session, learners=60, lessons=10, courses=20, random_seed=24)
    for course in org.course_ids:
        with session_scope() as session:
            job_id = _confirm(session, org, course)
        with session_scope() as session:
            start = start_job(session, job_id, batch_size=1000, purge_partitions=2)
        with session_scope() as session:
            claim_batch(session, job_id, start.batch_nos[0], 5, 60)
        with session_scope() as session:
            purge = reset_batch(session, job_id, start.batch_nos[0]).purge
        assert purge
        errors: list[BaseException] = []

        def purge_steps(batch_no: int) -> None:
            try:
                while True:
                    with session_scope() as session:
                        step = purge_step(session, job_id, batch_no, 5)
                    if step.status != "progressed":
                        return
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=purge_steps, args=(no,)) for no, _ in purge]
        for thread in threads:
            thread.start()
        time.sleep(0.01)
        with session_scope() as session:
            resets.cancel(session, job_id, org.admin_id)
        with session_scope() as session:
            finalize_job(session, job_id)
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        with session_scope() as session:
            finalize_job(session, job_id)  # a purge step may have handed it on after
            st = resets.status(session, job_id)
            assert st["state"] == "cancelled", st
            assert _earlier_attempt_rows(session, course, _reset_learners(session, job_id, course)) == 0
