"""Domain functions of the training platform: assign a course, record learner activity.

Each takes a ``Session`` and never commits. Every function keeps
``course_analytics`` exact in the caller's transaction.

Concurrency with resets (R10): recording activity first locks the learner's
``course_assignments`` row, the same row a reset batch locks before clearing.
So activity either commits before the reset (and is cleared by it) or waits
for the reset to commit and is stamped with the new attempt (and survives).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from models import analytics
from models.components import RESET_COMPONENTS
from models.errors import NotFound, ValidationFailed
from models.schema import (
    ITEM_KINDS,
    AssessmentResult,
    AssignmentSubmission,
    Certificate,
    Course,
    CourseAssignment,
    CourseCompletion,
    CourseItem,
    DiscussionPost,
    LessonProgress,
    Organization,
    User,
)
from models.states import AssignmentStatus
from models.times import utcnow

PROGRESS_MODEL = {
    "lesson": LessonProgress,
    "practical_assessment": AssessmentResult,
    "discussion": DiscussionPost,
    "assignment": AssignmentSubmission,
}


def new_certificate_number(course_id: int) -> str:
    """A unique, unguessable certificate number; a new one for every issue (R8)."""
    return f"C{course_id}-{secrets.token_hex(6).upper()}"


@dataclass(frozen=True)
class ActivityResult:
    status: str
    progress_pct: float
    attempt: int
    completed_now: bool
    certificate_number: str | None


def create_organization(session: Session, name: str, time_zone: str = "UTC") -> Organization:
    org = Organization(name=name, time_zone=time_zone, created_at=utcnow())
    session.add(org)
    session.flush()
    return org


def create_user(
    session: Session,
    organization_id: int,
    name: str,
    email: str,
    permissions: tuple[str, ...] = (),
    notify_course_assigned: bool = True,
) -> User:
    user = User(
        organization_id=organization_id,
        name=name,
        email=email,
        permissions=" ".join(permissions),
        notify_course_assigned=notify_course_assigned,
        created_at=utcnow(),
    )
    session.add(user)
    session.flush()
    return user


def create_course(
    session: Session,
    organization_id: int,
    title: str,
    items: list[tuple[str, str]] | None = None,
    certificates_enabled: bool = True,
) -> Course:
    """Create a course with its content items ``[(kind, title), ...]`` (all required)."""
    course = Course(
        organization_id=organization_id, title=title, certificates_enabled=certificates_enabled, created_at=utcnow()
    )
    session.add(course)
    session.flush()
    for position, (kind, item_title) in enumerate(items or []):
        if kind not in ITEM_KINDS:
            raise ValidationFailed(f"unknown item kind {kind!r}; expected one of {', '.join(ITEM_KINDS)}")
        session.add(CourseItem(course_id=course.id, kind=kind, title=item_title, position=position, required=True))
    analytics.ensure_analytics_row(session, course.id)
    session.flush()
    return course


def required_item_count(session: Session, course_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(CourseItem).where(CourseItem.course_id == course_id, CourseItem.required)
    ) or 0


def assign_course(session: Session, course_id: int, user_id: int, at: datetime | None = None) -> CourseAssignment:
    """Assign the learner to the course; assigning twice returns the existing assignment."""
    course = session.get(Course, course_id)
    user = session.get(User, user_id)
    if course is None or user is None or course.organization_id != user.organization_id:
        raise NotFound(f"course {course_id} or learner {user_id} not found in one organization")
    existing = session.get(CourseAssignment, (course_id, user_id))
    if existing is not None:
        return existing
    assignment = CourseAssignment(
        course_id=course_id, user_id=user_id, status=AssignmentStatus.NOT_STARTED, progress_pct=0.0, items_done=0,
        attempt=1, assigned_at=at or utcnow(),
    )
    session.add(assignment)
    session.flush()
    analytics.ensure_analytics_row(session, course_id)
    analytics.apply_delta(session, course_id, **analytics.status_delta(None, AssignmentStatus.NOT_STARTED))
    return assignment


def unassign_course(session: Session, course_id: int, user_id: int) -> bool:
    """Remove the learner from the course with everything of theirs in it; False if not assigned."""
    assignment = _lock_assignment(session, course_id, user_id, missing_ok=True)
    if assignment is None:
        return False
    old_status = assignment.status
    for component in RESET_COMPONENTS:
        t = component.table
        session.execute(delete(t).where(t.c.course_id == course_id, t.c.user_id == user_id))
    session.delete(assignment)
    session.flush()
    analytics.apply_delta(session, course_id, **analytics.status_delta(old_status, None))
    return True


def _lock_assignment(session: Session, course_id: int, user_id: int, missing_ok: bool = False):
    assignment = session.execute(
        select(CourseAssignment)
        .where(CourseAssignment.course_id == course_id, CourseAssignment.user_id == user_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if assignment is None and not missing_ok:
        raise NotFound(f"learner {user_id} is not assigned to course {course_id}")
    return assignment


def _item_already_done(session: Session, item: CourseItem, user_id: int, attempt: int) -> bool:
    model = PROGRESS_MODEL[item.kind]
    query = select(func.count()).select_from(model).where(
        model.course_id == item.course_id, model.user_id == user_id, model.item_id == item.id, model.attempt == attempt
    )
    if item.kind == "practical_assessment":
        query = query.where(AssessmentResult.passed)
    return (session.scalar(query) or 0) > 0


def record_activity(
    session: Session,
    course_id: int,
    user_id: int,
    item_id: int,
    *,
    at: datetime | None = None,
    score: float | None = None,
    passed: bool = True,
    body: str = "",
    grade: float | None = None,
) -> ActivityResult:
    """Record one piece of learner activity on a course item and move the learner's state.

    Lesson completed, assessment result, discussion post or assignment submitted,
    depending on the item's kind. Updates progress %, moves the status
    (not_started -> in_progress -> completed), records the completion and issues
    a certificate when every required item is done, and keeps analytics exact.
    """
    at = at or utcnow()
    assignment = _lock_assignment(session, course_id, user_id)
    item = session.get(CourseItem, item_id)
    if item is None or item.course_id != course_id:
        raise NotFound(f"item {item_id} not found in course {course_id}")
    attempt = assignment.attempt
    newly_done = item.required and not _item_already_done(session, item, user_id, attempt)
    if item.kind == "practical_assessment":
        newly_done = newly_done and passed
        session.add(AssessmentResult(course_id=course_id, user_id=user_id, item_id=item_id, attempt=attempt,
                                     score=score if score is not None else 0.0, passed=passed, recorded_at=at))
    elif item.kind == "lesson":
        session.add(LessonProgress(course_id=course_id, user_id=user_id, item_id=item_id, attempt=attempt,
                                   recorded_at=at))
    elif item.kind == "discussion":
        session.add(DiscussionPost(course_id=course_id, user_id=user_id, item_id=item_id, attempt=attempt,
                                   body=body, recorded_at=at))
    else:
        session.add(AssignmentSubmission(course_id=course_id, user_id=user_id, item_id=item_id, attempt=attempt,
                                         grade=grade, recorded_at=at))

    old_status = assignment.status
    if old_status == AssignmentStatus.NOT_STARTED:
        assignment.status = AssignmentStatus.IN_PROGRESS
        assignment.started_at = at
    if newly_done:
        assignment.items_done += 1
    required = required_item_count(session, course_id)
    assignment.progress_pct = round(100.0 * min(assignment.items_done, required) / required, 2) if required else 0.0

    completed_now = False
    certificate_number = None
    if required and assignment.items_done >= required and old_status != AssignmentStatus.COMPLETED:
        completed_now = True
        assignment.status = AssignmentStatus.COMPLETED
        assignment.completed_at = at
        assignment.progress_pct = 100.0
        session.flush()
        assignment.score = session.scalar(
            select(func.avg(AssessmentResult.score)).where(
                AssessmentResult.course_id == course_id,
                AssessmentResult.user_id == user_id,
                AssessmentResult.attempt == attempt,
                AssessmentResult.passed,
            )
        )
        session.add(CourseCompletion(course_id=course_id, user_id=user_id, attempt=attempt, status=AssignmentStatus.COMPLETED,
                                     score=assignment.score, progress_pct=100.0, completed_at=at))
        course = session.get(Course, course_id)
        if course is not None and course.certificates_enabled:
            certificate_number = new_certificate_number(course_id)
            session.add(Certificate(course_id=course_id, user_id=user_id, attempt=attempt,
                                    number=certificate_number, issued_at=at))
    session.flush()
    analytics.apply_delta(session, course_id, **analytics.status_delta(old_status, assignment.status))
    return ActivityResult(assignment.status, assignment.progress_pct, attempt, completed_now, certificate_number)
