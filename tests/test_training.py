"""The training rules (models.training) against real PostgreSQL, rolled back per test.

After every step the course's analytics row must equal a recomputation from
the assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import analytics, training
from models.components import RESET_COMPONENTS
from models.errors import NotFound, ValidationFailed
from models.schema import (
    AssessmentResult,
    AssignmentSubmission,
    Certificate,
    CourseAssignment,
    CourseCompletion,
    CourseItem,
    DiscussionPost,
    LessonProgress,
)

ITEMS = [
    ("lesson", "Lesson 1"),
    ("lesson", "Lesson 2"),
    ("practical_assessment", "Practical assessment"),
    ("discussion", "Discussion"),
    ("assignment", "Assignment"),
]


@dataclass
class World:
    org_id: int
    learners: list[int]
    course_id: int
    items: dict[str, int]  # title -> item id


def make_world(session: Session, learners: int = 3, certificates: bool = True) -> World:
    org = training.create_organization(session, "Acme")
    learner_ids = [
        training.create_user(session, org.id, f"Learner {n}", f"l{n}@example.com").id for n in range(learners)
    ]
    course = training.create_course(session, org.id, "Forklift safety", ITEMS, certificates_enabled=certificates)
    items = dict(session.execute(select(CourseItem.title, CourseItem.id).where(CourseItem.course_id == course.id)).all())
    return World(org.id, learner_ids, course.id, items)


def assert_analytics_exact(session: Session, course_id: int) -> analytics.AnalyticsRow:
    stored = analytics.read_analytics(session, course_id)
    exact = analytics.count_from_rows(session, course_id)
    assert stored == exact, f"course_analytics drifted: stored {stored}, rows say {exact}"
    return stored


def count(session: Session, model, course_id: int, user_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(model).where(model.course_id == course_id, model.user_id == user_id)
    )


def assignment_of(session: Session, course_id: int, user_id: int) -> CourseAssignment:
    return session.execute(
        select(CourseAssignment)
        .where(CourseAssignment.course_id == course_id, CourseAssignment.user_id == user_id)
        .execution_options(populate_existing=True)
    ).scalar_one()


def complete_everything(session: Session, w: World, user_id: int, score: float = 80.0) -> training.ActivityResult:
    result = None
    for title, item_id in w.items.items():
        result = training.record_activity(session, w.course_id, user_id, item_id, score=score, passed=True)
        assert_analytics_exact(session, w.course_id)
    return result


def test_new_course_has_an_analytics_row_of_zeros(db_session):
    w = make_world(db_session)
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(0, 0, 0, 0, 0.0)


def test_assigning_twice_is_idempotent(db_session):
    w = make_world(db_session)
    first = training.assign_course(db_session, w.course_id, w.learners[0])
    second = training.assign_course(db_session, w.course_id, w.learners[0])
    assert first is second
    rows = db_session.scalar(select(func.count()).select_from(CourseAssignment)
                             .where(CourseAssignment.course_id == w.course_id))
    assert rows == 1
    assert first.status == "not_started" and first.progress_pct == 0.0 and first.attempt == 1
    assert first.last_reset_job_id is None
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(1, 1, 0, 0, 0.0)


def test_assigning_across_organizations_is_refused(db_session):
    w = make_world(db_session)
    other = training.create_organization(db_session, "Other")
    stranger = training.create_user(db_session, other.id, "Stranger", "s@example.com")
    with pytest.raises(NotFound):
        training.assign_course(db_session, w.course_id, stranger.id)
    with pytest.raises(NotFound):
        training.assign_course(db_session, w.course_id + 10_000, w.learners[0])
    assert assert_analytics_exact(db_session, w.course_id).assigned == 0


@pytest.mark.parametrize(
    "title, model, kwargs",
    [
        ("Lesson 1", LessonProgress, {}),
        ("Practical assessment", AssessmentResult, {"score": 91.0, "passed": True}),
        ("Discussion", DiscussionPost, {"body": "We should check the brakes first."}),
        ("Assignment", AssignmentSubmission, {"grade": 7.5}),
    ],
)
def test_each_kind_of_activity_starts_the_course_and_counts(db_session, title, model, kwargs):
    w = make_world(db_session)
    learner = w.learners[0]
    training.assign_course(db_session, w.course_id, learner)

    result = training.record_activity(db_session, w.course_id, learner, w.items[title], **kwargs)

    assert result.status == "in_progress"
    assert result.progress_pct == 20.0  # one of five required items
    assert result.completed_now is False and result.certificate_number is None
    assignment = assignment_of(db_session, w.course_id, learner)
    assert assignment.status == "in_progress" and assignment.started_at is not None
    assert assignment.items_done == 1
    assert count(db_session, model, w.course_id, learner) == 1
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(1, 0, 1, 0, 0.0)


def test_failed_assessment_is_recorded_but_does_not_count(db_session):
    w = make_world(db_session)
    learner = w.learners[0]
    training.assign_course(db_session, w.course_id, learner)
    item = w.items["Practical assessment"]

    failed = training.record_activity(db_session, w.course_id, learner, item, score=30.0, passed=False)
    assert failed.status == "in_progress" and failed.progress_pct == 0.0
    assert_analytics_exact(db_session, w.course_id)

    passed = training.record_activity(db_session, w.course_id, learner, item, score=75.0, passed=True)
    assert passed.progress_pct == 20.0
    assert count(db_session, AssessmentResult, w.course_id, learner) == 2
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(1, 0, 1, 0, 0.0)


def test_repeating_an_item_does_not_count_twice(db_session):
    w = make_world(db_session)
    learner = w.learners[0]
    training.assign_course(db_session, w.course_id, learner)
    training.record_activity(db_session, w.course_id, learner, w.items["Lesson 1"])
    again = training.record_activity(db_session, w.course_id, learner, w.items["Lesson 1"])
    assert again.progress_pct == 20.0
    assert assignment_of(db_session, w.course_id, learner).items_done == 1
    assert_analytics_exact(db_session, w.course_id)


def test_completing_every_required_item_completes_the_course_with_a_certificate(db_session):
    w = make_world(db_session, learners=3, certificates=True)
    for learner in w.learners:
        training.assign_course(db_session, w.course_id, learner)
    learner = w.learners[0]
    progress = []
    for title, item_id in w.items.items():
        score = 60.0 if title == "Practical assessment" else None
        result = training.record_activity(db_session, w.course_id, learner, item_id, score=score)
        progress.append(result.progress_pct)
        assert_analytics_exact(db_session, w.course_id)
    assert progress == [20.0, 40.0, 60.0, 80.0, 100.0]

    assert result.status == "completed" and result.completed_now is True
    assert result.certificate_number is not None
    assignment = assignment_of(db_session, w.course_id, learner)
    assert assignment.status == "completed" and assignment.progress_pct == 100.0
    assert assignment.completed_at is not None and assignment.score == 60.0

    completion = db_session.execute(select(CourseCompletion).where(CourseCompletion.course_id == w.course_id,
                                                                   CourseCompletion.user_id == learner)).scalar_one()
    assert (completion.attempt, completion.status, completion.progress_pct, completion.score) == (1, "completed",
                                                                                               100.0, 60.0)
    certificate = db_session.execute(select(Certificate).where(Certificate.course_id == w.course_id,
                                                               Certificate.user_id == learner)).scalar_one()
    assert certificate.number == result.certificate_number and certificate.attempt == 1
    assert certificate.issued_at is not None

    # One of three assigned learners completed: 33.3333 %.
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(3, 2, 0, 1, 33.3333)


def test_no_certificate_when_the_course_has_them_off(db_session):
    w = make_world(db_session, learners=1, certificates=False)
    learner = w.learners[0]
    training.assign_course(db_session, w.course_id, learner)
    result = complete_everything(db_session, w, learner)
    assert result.status == "completed" and result.completed_now and result.certificate_number is None
    assert count(db_session, CourseCompletion, w.course_id, learner) == 1
    assert count(db_session, Certificate, w.course_id, learner) == 0
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(1, 0, 0, 1, 100.0)


def test_activity_after_completion_does_not_complete_again(db_session):
    w = make_world(db_session, learners=1)
    learner = w.learners[0]
    training.assign_course(db_session, w.course_id, learner)
    complete_everything(db_session, w, learner)
    again = training.record_activity(db_session, w.course_id, learner, w.items["Lesson 1"])
    assert again.status == "completed" and again.completed_now is False and again.certificate_number is None
    assert count(db_session, CourseCompletion, w.course_id, learner) == 1
    assert count(db_session, Certificate, w.course_id, learner) == 1
    assert_analytics_exact(db_session, w.course_id)


def test_certificate_numbers_are_unique(db_session):
    w = make_world(db_session, learners=3)
    numbers = set()
    for learner in w.learners:
        training.assign_course(db_session, w.course_id, learner)
        numbers.add(complete_everything(db_session, w, learner).certificate_number)
    assert len(numbers) == 3
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(3, 0, 0, 3, 100.0)


def test_activity_needs_an_assignment_and_an_item_of_the_course(db_session):
    w = make_world(db_session, learners=2)
    training.assign_course(db_session, w.course_id, w.learners[0])
    with pytest.raises(NotFound):
        training.record_activity(db_session, w.course_id, w.learners[1], w.items["Lesson 1"])
    other_course = training.create_course(db_session, w.org_id, "Other", [("lesson", "Elsewhere")])
    foreign_item = db_session.scalar(select(CourseItem.id).where(CourseItem.course_id == other_course.id))
    with pytest.raises(NotFound):
        training.record_activity(db_session, w.course_id, w.learners[0], foreign_item)
    assert count(db_session, LessonProgress, w.course_id, w.learners[0]) == 0
    assert_analytics_exact(db_session, w.course_id)


def test_unknown_item_kind_is_refused(db_session):
    org = training.create_organization(db_session, "Acme")
    with pytest.raises(ValidationFailed, match="unknown item kind"):
        training.create_course(db_session, org.id, "Bad", [("video", "Clip")])


def test_unassign_removes_the_learners_rows_in_that_course_only(db_session):
    w = make_world(db_session, learners=2)
    other = training.create_course(db_session, w.org_id, "Other course", ITEMS)
    other_items = dict(db_session.execute(select(CourseItem.title, CourseItem.id)
                                          .where(CourseItem.course_id == other.id)).all())
    for learner in w.learners:
        training.assign_course(db_session, w.course_id, learner)
        training.assign_course(db_session, other.id, learner)
        complete_everything(db_session, w, learner)
        training.record_activity(db_session, other.id, learner, other_items["Lesson 1"])
    gone, kept = w.learners

    assert training.unassign_course(db_session, w.course_id, gone) is True
    assert training.unassign_course(db_session, w.course_id, gone) is False

    for component in RESET_COMPONENTS:
        t = component.table

        def rows(course_id: int, user_id: int) -> int:
            return db_session.scalar(select(func.count()).select_from(t)
                                     .where(t.c.course_id == course_id, t.c.user_id == user_id))

        assert rows(w.course_id, gone) == 0, component.name
        assert rows(w.course_id, kept) >= 1, component.name
    assert count(db_session, LessonProgress, w.course_id, kept) == 2
    assert count(db_session, LessonProgress, other.id, gone) == 1
    assert db_session.get(CourseAssignment, (w.course_id, gone)) is None
    assert db_session.get(CourseAssignment, (other.id, gone)) is not None
    assert assert_analytics_exact(db_session, w.course_id) == analytics.AnalyticsRow(1, 0, 0, 1, 100.0)
    assert assert_analytics_exact(db_session, other.id) == analytics.AnalyticsRow(2, 0, 2, 0, 0.0)


def test_recompute_agrees_with_the_deltas(db_session):
    w = make_world(db_session, learners=3)
    for learner in w.learners:
        training.assign_course(db_session, w.course_id, learner)
    complete_everything(db_session, w, w.learners[0])
    training.record_activity(db_session, w.course_id, w.learners[1], w.items["Discussion"])
    exact, previous = analytics.recompute_course_analytics(db_session, w.course_id)
    assert exact == previous == analytics.AnalyticsRow(3, 1, 1, 1, 33.3333)
