"""The bulk seed (models.seed) on PostgreSQL and on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from models import analytics
from models.db import make_engine
from models.errors import ValidationFailed
from models.migrate import upgrade
from models.schema import (
    PERMISSION_TRAINING,
    PERMISSION_USERS,
    Certificate,
    CourseAssignment,
    CourseCompletion,
    CourseItem,
    LessonProgress,
    User,
)
from models.seed import seed


@contextmanager
def committed_session(url: str) -> Iterator[Session]:
    engine = make_engine(url)
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session
    finally:
        engine.dispose()


def check_course(session: Session, course_id: int, lessons: int) -> dict[str, int]:
    """The seeded course is internally consistent; returns its counts."""
    assert analytics.read_analytics(session, course_id) == analytics.count_from_rows(session, course_id)

    def n(model, *where) -> int:
        return session.scalar(select(func.count()).select_from(model).where(model.course_id == course_id, *where))

    completed = n(CourseAssignment, CourseAssignment.status == "completed")
    counts = {
        "assigned": n(CourseAssignment),
        "completed": completed,
        "in_progress": n(CourseAssignment, CourseAssignment.status == "in_progress"),
        "completions": n(CourseCompletion),
        "certificates": n(Certificate),
        "lesson_rows": n(LessonProgress),
    }
    assert counts["completions"] == counts["certificates"] == completed
    # Each learner has one lesson row per lesson done (items before the extras are lessons).
    expected_lessons = session.scalar(
        select(func.coalesce(func.sum(func.least(CourseAssignment.items_done, lessons)), 0))
        .where(CourseAssignment.course_id == course_id)
    ) if session.get_bind().dialect.name == "postgresql" else None
    if expected_lessons is not None:
        assert counts["lesson_rows"] == expected_lessons
    # Completed learners are at 100 %, others below; statuses agree with progress.
    bad = session.scalar(
        select(func.count()).select_from(CourseAssignment).where(
            CourseAssignment.course_id == course_id,
            ((CourseAssignment.status == "completed") & (CourseAssignment.progress_pct != 100.0))
            | ((CourseAssignment.status == "not_started") & (CourseAssignment.items_done != 0))
            | ((CourseAssignment.status == "in_progress") & (CourseAssignment.progress_pct >= 100.0)),
        )
    )
    assert bad == 0
    return counts


def test_seed_on_postgres_is_consistent(db_session):
    result = seed(db_session, learners=400, lessons=6, courses=2, completed_ratio=0.3, random_seed=7)

    assert result.learners == 400 and len(result.course_ids) == 2
    for course_id in result.course_ids:
        counts = check_course(db_session, course_id, lessons=6)
        assert counts["assigned"] == 400
        # Ratios are random draws; the bounds are loose but catch a broken split.
        assert 60 <= counts["completed"] <= 180 and counts["in_progress"] >= 60

    admin = db_session.get(User, result.admin_id)
    learner = db_session.get(User, result.learner_id)
    assert admin.has_permission(PERMISSION_USERS) and admin.has_permission(PERMISSION_TRAINING)
    assert not learner.has_permission(PERMISSION_USERS) and not learner.has_permission(PERMISSION_TRAINING)
    assert admin.organization_id == learner.organization_id == result.organization_id
    notify_off = db_session.scalar(select(func.count()).select_from(User).where(
        User.organization_id == result.organization_id, User.notify_course_assigned.is_(False)))
    assert 0 < notify_off < 120, "about one learner in ten has course-assigned notifications off"
    items = db_session.scalars(select(CourseItem.kind).where(CourseItem.course_id == result.course_ids[0])
                               .order_by(CourseItem.position)).all()
    assert items == ["lesson"] * 6 + ["practical_assessment", "discussion", "assignment"]


def test_two_runs_make_two_organizations(db_session):
    first = seed(db_session, learners=20, lessons=2, random_seed=1)
    second = seed(db_session, learners=20, lessons=2, random_seed=1)
    assert first.organization_id != second.organization_id
    assert not set(first.course_ids) & set(second.course_ids)
    for result in (first, second):
        users = db_session.scalar(select(func.count()).select_from(User)
                                  .where(User.organization_id == result.organization_id))
        assert users == 21  # the learners and the admin
        check_course(db_session, result.course_ids[0], lessons=2)


def test_seed_lays_progress_rows_out_by_time_not_by_learner(fresh_db):
    url = fresh_db()
    with committed_session(url) as session:
        result = seed(session, learners=600, lessons=10, courses=1, completed_ratio=0.5, random_seed=3)
    with committed_session(url) as session:
        rows = session.execute(text(
            "SELECT user_id, recorded_at FROM lesson_progress "
            "WHERE course_id = :course ORDER BY ctid"), {"course": result.course_ids[0]}).all()
    assert len(rows) > 3000
    times = [r.recorded_at for r in rows]
    assert times == sorted(times), "the physical order of lesson_progress is the order of recorded_at"
    same_learner_neighbours = sum(1 for a, b in zip(rows, rows[1:]) if a.user_id == b.user_id)
    assert same_learner_neighbours / (len(rows) - 1) < 0.05, "consecutive rows mostly belong to different learners"
    # Clustered by learner, a learner's rows would span as many positions as they have rows.
    positions: dict[int, list[int]] = {}
    for position, r in enumerate(rows):
        positions.setdefault(r.user_id, []).append(position)
    spans = sorted((p[-1] - p[0] + 1) / len(p) for p in positions.values() if len(p) > 1)
    assert spans[len(spans) // 2] > 10, "one learner's rows lie scattered across the table"


def test_seed_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'seed.db'}"
    upgrade(url)
    with committed_session(url) as session:
        result = seed(session, learners=50, lessons=3, courses=2, random_seed=5)
    with committed_session(url) as session:
        for course_id in result.course_ids:
            counts = check_course(session, course_id, lessons=3)
            assert counts["assigned"] == 50 and counts["completed"] >= 1
        learner_rows = session.scalar(select(func.count()).select_from(LessonProgress)
                                      .where(LessonProgress.course_id == result.course_ids[0]))
        assert learner_rows > 0


@pytest.mark.parametrize("kwargs", [{"learners": 0}, {"learners": 5, "lessons": 0}, {"learners": 5, "courses": 0},
                                    {"learners": 5, "completed_ratio": 1.5}])
def test_seed_refuses_bad_sizes(db_session, kwargs):
    with pytest.raises(ValidationFailed):
        seed(db_session, **kwargs)


@pytest.mark.slow
def test_seed_of_100k_learners_takes_under_a_minute(fresh_db):
    import time

    url = fresh_db()
    started = time.perf_counter()
    with committed_session(url) as session:
        seed(session, learners=100_000, lessons=20)
    assert time.perf_counter() - started < 60
