"""Fair turns (decision record 0005): organizations and jobs take turns for worker capacity.

The plain pickers are tested on PostgreSQL and on SQLite (``pipeline_db``); the end-to-end test
runs a real worker on every queue over a backlog of one organization's jobs.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from models.db import dispose_engine, session_scope
from models.job_ids import job_uuid
from models.schema import LessonProgress, ResetJob
from models.seed import seed
from models.times import utcnow
from producer import resets
from tasks.resets.failures import defer_unit
from tasks.resets.start import start_job
from tasks.resets.turns import claim_next_unit, next_queued_job, runnable_units
from tests.db_backends import pipeline_db  # noqa: F401 - the fixture


def _confirm_all(session, org, course_ids):
    jobs = []
    for course in course_ids:
        req = resets.request(session, org.admin_id, course, reason="fair turns")
        jobs.append(resets.confirm(session, req.request_id, org.admin_id, req.token).job_id)
    return jobs


def _org_of(session, job_id) -> int:
    return session.scalar(select(ResetJob.organization_id).where(ResetJob.id == job_uuid(job_id)))


def test_units_alternate_between_organizations_and_round_robin_over_a_backlog(pipeline_db):
    a = seed(pipeline_db, learners=60, lessons=3, courses=3, random_seed=1)
    b = seed(pipeline_db, learners=60, lessons=3, courses=1, random_seed=2)
    a_jobs = _confirm_all(pipeline_db, a, a.course_ids)
    for job_id in a_jobs:  # organization A's backlog is planned first: several batches per job
        assert start_job(pipeline_db, job_id, batch_size=10).started
    # Organization A has been served for a while before B's job arrives.
    for _ in range(4):
        unit = claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60)
        assert _org_of(pipeline_db, unit.job_id) == a.organization_id
    (b_job,) = _confirm_all(pipeline_db, b, b.course_ids)
    b_batches = len(start_job(pipeline_db, b_job, batch_size=10).batch_nos)
    assert b_batches >= 3

    order = []
    while (unit := claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60)) is not None:
        order.append(unit.job_id)
    orgs = [_org_of(pipeline_db, job_id) for job_id in order]
    # B waits for about one unit per other active organization: its units alternate with A's.
    first_b = orgs.index(b.organization_id)
    assert first_b <= 1, orgs
    b_positions = [i for i, org in enumerate(orgs) if org == b.organization_id]
    assert len(b_positions) == b_batches
    assert b_positions[-1] <= 2 * len(b_positions), orgs
    # Within A, the jobs take turns: no job gets two units while another of A's waits.
    a_order = [job for job in order if job in a_jobs]
    for window in range(0, len(a_order) - 2, 3):
        assert len(set(a_order[window:window + 3])) == 3, a_order


def test_the_queued_job_of_the_least_recently_served_organization_starts_first(pipeline_db):
    a = seed(pipeline_db, learners=20, lessons=2, courses=3, random_seed=3)
    b = seed(pipeline_db, learners=20, lessons=2, courses=1, random_seed=4)
    a_jobs = _confirm_all(pipeline_db, a, a.course_ids)
    first = next_queued_job(pipeline_db)
    assert str(first) == a_jobs[0]
    start_job(pipeline_db, first, batch_size=10)
    (b_job,) = _confirm_all(pipeline_db, b, b.course_ids)  # confirmed after all of A's
    assert str(next_queued_job(pipeline_db)) == b_job


def test_a_unit_whose_lease_ran_out_is_claimed_again_and_a_deferred_one_waits(pipeline_db):
    org = seed(pipeline_db, learners=30, lessons=2, courses=1, random_seed=5)
    (job_id,) = _confirm_all(pipeline_db, org, org.course_ids)
    start_job(pipeline_db, job_id, batch_size=10)
    first = claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60)
    defer_unit(pipeline_db, job_id, first.batch_no, seconds=30)
    claimed = {first.batch_no}
    while (unit := claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60)) is not None:
        claimed.add(unit.batch_no)
    assert len(claimed) == 3 and runnable_units(pipeline_db, job_id) == 0
    later = utcnow() + timedelta(seconds=61)
    again = claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60, now=later)
    assert again is not None and again.claim.attempts == 2


def test_small_components_are_cleared_by_the_learner_batches_and_large_ones_purged(pipeline_db):
    org = seed(pipeline_db, learners=200, lessons=10, courses=1, random_seed=6)
    (job_id,) = _confirm_all(pipeline_db, org, org.course_ids)
    lessons = pipeline_db.scalar(select(func.count()).select_from(LessonProgress)
                                .where(LessonProgress.course_id == org.course_ids[0]))
    assert 1000 < lessons <= 2000  # and a few hundred rows of each other component
    start = start_job(pipeline_db, job_id, batch_size=100, purge_partitions=4, purge_chunk_rows=500,
                                  purge_min_rows=1000)
    job = pipeline_db.get(ResetJob, job_uuid(job_id))
    assert set(job.watermarks) == {"lesson_progress"}
    # One partition per chunk of rows, rounded up (and never more than the partitions).
    assert start.purge_total == job.purge_total == -(-lessons // 500)


@pytest.fixture
def env(fresh_db, use_env, redis_url, tmp_path):
    yield use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, RESET_BATCH_SIZE="25",
                  NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"), NOTIFY_RATE_PER_SECOND="5000",
                  LOG_FORMAT="json")
    dispose_engine()


def test_another_organizations_job_finishes_before_a_backlog_drains(env, celery_worker_proc):
    """Organization A queues 20 course-wide resets (4 batches each) before any worker runs; then
    organization B confirms one. One worker serves every queue; B must not wait behind A."""
    # PostgreSQL + Redis: a real worker (the SQLite path end to end is the demo's test).
    with session_scope() as session:
        a = seed(session, learners=100, lessons=4, courses=20, random_seed=7)
        b = seed(session, learners=100, lessons=4, courses=1, random_seed=8)
    with session_scope() as session:
        a_jobs = _confirm_all(session, a, a.course_ids)
    with session_scope() as session:
        (b_job,) = _confirm_all(session, b, b.course_ids)
    celery_worker_proc(env, queues="resets,reset_batches,notifications,maintenance", concurrency=2, name="fair")

    deadline = time.monotonic() + 180
    while True:
        with session_scope() as session:
            rows = session.execute(select(ResetJob.id, ResetJob.state, ResetJob.finished_at)
                                   .where(ResetJob.id.in_([job_uuid(j) for j in a_jobs + [b_job]]))).all()
        if all(state == "succeeded" for _, state, _ in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    finished = {str(job_id): at for job_id, _, at in rows}
    after_b = sum(1 for job in a_jobs if finished[job] > finished[b_job])
    # Round-robin: B's 4 units alternate with A's, so B ends while nearly all of A's jobs still run.
    assert after_b >= len(a_jobs) * 3 // 4, (after_b, len(a_jobs))


def test_a_redelivered_wake_up_takes_back_the_unit_its_dead_worker_held(pipeline_db):
    org = seed(pipeline_db, learners=30, lessons=2, courses=1, random_seed=9)
    (job_id,) = _confirm_all(pipeline_db, org, org.course_ids)
    start_job(pipeline_db, job_id, batch_size=10)
    held = claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60, owner="message-1")
    other = claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60, owner="message-2")
    assert other.batch_no != held.batch_no
    # message-1 comes back (its worker was killed): same batch, lease or not, one more attempt.
    again = claim_next_unit(pipeline_db, max_attempts=5, lease_seconds=60, owner="message-1")
    assert (again.batch_no, again.claim.attempts) == (held.batch_no, 2)


def test_a_wake_up_that_finds_only_locked_units_comes_back_instead_of_ending(fresh_db, use_env, redis_url):
    """A worker killed inside a unit leaves its row locked until PostgreSQL notices the closed
    connection. The redelivered wake-up must not read that as "no work" (nothing would wake the
    job's last units again): it sees the unit waiting and retries under its own id."""
    # PostgreSQL only: a row lock held by another connection, skipped by SKIP LOCKED.
    use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url)
    with session_scope() as session:
        org = seed(session, learners=12, lessons=2, courses=1, random_seed=4)
        (job_id,) = _confirm_all(session, org, org.course_ids)
        (batch_no,) = start_job(session, job_id, batch_size=50).batch_nos
    with session_scope() as session:
        held = claim_next_unit(session, max_attempts=5, lease_seconds=60, owner="message-1")
    assert held.batch_no == batch_no
    from models.db import get_engine
    from models.schema import ResetBatch

    with get_engine().connect() as dead_worker:  # its transaction still holds the batch row
        dead_worker.execute(select(ResetBatch.batch_no).where(ResetBatch.batch_no == batch_no)
                            .with_for_update())
        with session_scope() as session:
            assert claim_next_unit(session, 5, 60, owner="message-1") is None
            assert runnable_units(session, owner="message-1") == 1
            assert runnable_units(session, owner="message-2") == 0  # another's lease is live
        dead_worker.rollback()
    with session_scope() as session:
        again = claim_next_unit(session, 5, 60, owner="message-1")
    assert (again.batch_no, again.claim.attempts) == (batch_no, 2)
