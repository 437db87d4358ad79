"""R10 and R11 with real concurrent transactions on PostgreSQL (separate connections, real row locks)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from models import analytics
from models.db import dispose_engine, session_scope
from models.errors import Conflict
from models.schema import CourseAssignment, CourseItem, LessonProgress
from models.seed import seed
from models.training import record_activity
from producer import resets
from tasks.resets.finalize import finalize_job
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.start import start_job
from tests.reset_checks import drain_purge


@pytest.fixture
def committed_org(fresh_db, use_env, redis_url):
    use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url)
    with session_scope() as session:
        org = seed(session, learners=60, lessons=4, courses=2, completed_ratio=0.5, random_seed=3)
    yield org
    dispose_engine()


def _start_course_job(org, course):
    with session_scope() as session:
        req = resets.request(session, org.admin_id, course, reason="r10")
        job_id = resets.confirm(session, req.request_id, org.admin_id, req.token).job_id
    with session_scope() as session:
        start = start_job(session, job_id, batch_size=1000)
    with session_scope() as session:
        assert claim_batch(session, job_id, start.batch_nos[0], 5, 60).runnable
    return job_id, start.batch_nos[0]


def _finish(job_id, released):
    """Run the purge the learner phase released, then finalize (each in its own transaction)."""
    with session_scope() as session:
        drain_purge(session, job_id, released)
    with session_scope() as session:
        assert finalize_job(session, job_id).state == "succeeded"


def _lesson(course):
    with session_scope() as session:
        return session.scalar(select(CourseItem.id).where(CourseItem.course_id == course, CourseItem.kind == "lesson")
                              .order_by(CourseItem.position))


def _in_progress_learner(course):
    with session_scope() as session:
        return session.scalar(select(CourseAssignment.user_id).where(CourseAssignment.course_id == course,
                                                                     CourseAssignment.status == "in_progress"))


def _lesson_rows(course, learner):
    with session_scope() as session:
        return session.execute(select(LessonProgress.attempt, func.count()).where(
            LessonProgress.course_id == course, LessonProgress.user_id == learner).group_by(LessonProgress.attempt)
        ).all()


def test_activity_committed_while_the_batch_waits_is_cleared(committed_org):
    """Activity holds the learner's row first: the batch waits, then clears it (it was before the reset)."""
    course = committed_org.course_ids[0]
    learner = _in_progress_learner(course)
    lesson = _lesson(course)
    job_id, batch_no = _start_course_job(committed_org, course)
    activity_locked = threading.Event()
    release = threading.Event()

    def activity():
        with session_scope() as session:
            record_activity(session, course, learner, lesson)
            activity_locked.set()
            release.wait(10)

    t = threading.Thread(target=activity)
    t.start()
    assert activity_locked.wait(10)
    batch_done = threading.Event()

    released = []

    def batch():
        with session_scope() as session:
            released.extend(reset_batch(session, job_id, batch_no).purge)
        batch_done.set()

    b = threading.Thread(target=batch)
    b.start()
    time.sleep(0.5)
    assert not batch_done.is_set(), "the batch must wait for the learner's row lock"
    release.set()
    t.join(10)
    b.join(10)
    assert batch_done.is_set()
    _finish(job_id, released)
    assert _lesson_rows(course, learner) == []  # progress from before the reset never survives


def test_activity_after_the_learners_reset_commits_survives(committed_org):
    """The batch holds the row: activity waits, then lands in the new attempt and is never lost."""
    course = committed_org.course_ids[0]
    learner = _in_progress_learner(course)
    lesson = _lesson(course)
    job_id, batch_no = _start_course_job(committed_org, course)
    batch_locked = threading.Event()
    release = threading.Event()

    released = []

    def batch():
        with session_scope() as session:
            released.extend(reset_batch(session, job_id, batch_no).purge)
            batch_locked.set()
            release.wait(10)

    b = threading.Thread(target=batch)
    b.start()
    assert batch_locked.wait(10)
    recorded = threading.Event()
    results = []

    def activity():
        with session_scope() as session:
            results.append(record_activity(session, course, learner, lesson))
        recorded.set()

    t = threading.Thread(target=activity)
    t.start()
    time.sleep(0.5)
    assert not recorded.is_set(), "activity must wait for the reset of this learner to commit"
    release.set()
    b.join(10)
    t.join(10)
    assert results and results[0].attempt == 2
    _finish(job_id, released)
    assert _lesson_rows(course, learner) == [(2, 1)]
    with session_scope() as session:
        assignment = session.get(CourseAssignment, (course, learner))
        assert (assignment.status, assignment.attempt) == ("in_progress", 2)
        assert analytics.read_analytics(session, course) == analytics.count_from_rows(session, course)


def test_one_active_reset_per_course_and_per_learner(committed_org):
    org = committed_org
    course, other = org.course_ids
    with session_scope() as session:
        first = resets.request(session, org.admin_id, course, reason="first")
        # Unconfirmed requests block nothing.
        second = resets.request(session, org.admin_id, course, reason="second")
        learner_req = resets.request(session, org.admin_id, course, learner_id=org.learner_id)
    with session_scope() as session:
        job_id = resets.confirm(session, first.request_id, org.admin_id, first.token).job_id
    for req in (second, learner_req):
        with pytest.raises(Conflict) as refused, session_scope() as session:
            resets.confirm(session, req.request_id, org.admin_id, req.token)
        assert job_id in str(refused.value) and "already being reset" in str(refused.value)
    with pytest.raises(Conflict) as refused, session_scope() as session:
        resets.request(session, org.admin_id, course, reason="third")
    assert job_id in str(refused.value)
    with session_scope() as session:  # another course is free
        resets.request(session, org.admin_id, other)


def test_concurrent_confirms_of_one_course_admit_exactly_one(committed_org):
    org = committed_org
    course = org.course_ids[0]
    with session_scope() as session:
        reqs = [resets.request(session, org.admin_id, course, reason=f"r{i}") for i in range(6)]
    barrier = threading.Barrier(len(reqs))
    outcomes: list[str] = []

    def confirm(req):
        barrier.wait(10)
        try:
            with session_scope() as session:
                resets.confirm(session, req.request_id, org.admin_id, req.token)
            outcomes.append("queued")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=confirm, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(outcomes) == ["conflict"] * 5 + ["queued"]


def test_a_learner_confirm_waits_for_a_course_wide_confirm_in_flight_and_is_refused(committed_org):
    # Different scopes are different unique indexes: only the lock on the course orders them.
    org = committed_org
    course = org.course_ids[0]
    with session_scope() as session:
        whole = resets.request(session, org.admin_id, course, reason="course")
        one = resets.request(session, org.admin_id, course, learner_id=org.learner_id, reason="learner")
    course_confirmed, release = threading.Event(), threading.Event()

    def confirm_course_and_hold():
        with session_scope() as session:
            resets.confirm(session, whole.request_id, org.admin_id, whole.token)
            course_confirmed.set()
            release.wait(20)

    holder = threading.Thread(target=confirm_course_and_hold)
    holder.start()
    assert course_confirmed.wait(10)
    outcome: list[BaseException | str] = []

    def confirm_learner():
        try:
            with session_scope() as session:
                resets.confirm(session, one.request_id, org.admin_id, one.token)
            outcome.append("queued")
        except Exception as exc:
            outcome.append(exc)

    learner = threading.Thread(target=confirm_learner)
    learner.start()
    time.sleep(0.5)
    assert not outcome, "the learner confirm must wait while the course-wide confirm is uncommitted"
    release.set()
    holder.join(20)
    learner.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert "already being reset" in str(outcome[0])
