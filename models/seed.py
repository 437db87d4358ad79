"""Build a realistic organization in bulk (``progress-reset seed``).

Fast on PostgreSQL (COPY and set-based ``INSERT ... SELECT``), correct on SQLite.
Progress rows are laid out the way months of real activity leave them: ordered
by time, not by learner, so one learner's rows lie scattered across the table.
Every run makes a new organization, so two runs give two tenants.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import Table, select, text
from sqlalchemy.orm import Session

from models import analytics
from models.dialect import is_postgres
from models.errors import ValidationFailed
from models.schema import (
    PERMISSION_TRAINING,
    PERMISSION_USERS,
    CourseAssignment,
    CourseItem,
    User,
)
from models.states import AssignmentStatus
from models.training import create_course, create_organization, create_user

# Extra items after the lessons, in course order.
EXTRA_ITEMS = (("practical_assessment", "Practical assessment"), ("discussion", "Discussion"),
               ("assignment", "Assignment"))
# A learner's items are done ``_step(user_id)`` seconds apart, from their start date.
STEP_MIN_S = 3600
STEP_SPAN_S = 5 * 86400
NOTIFY_OFF_RATIO = 0.1


@dataclass
class SeedResult:
    organization_id: int
    admin_id: int
    learner_id: int
    course_ids: list[int]
    learners: int
    timings: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "organization_id": self.organization_id,
            "admin_id": self.admin_id,
            "learner_id": self.learner_id,
            "course_ids": self.course_ids,
            "learners": self.learners,
        }


def _step(user_id: int) -> int:
    # The same formula is written in SQL below (integer arithmetic in both dialects).
    return STEP_MIN_S + (user_id * 7919) % STEP_SPAN_S


def _score(user_id: int) -> float:
    return float(50 + (user_id * 31) % 51)


def bulk_insert(session: Session, table: Table, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """Insert many rows fast: COPY on PostgreSQL, chunked executemany elsewhere."""
    count = 0
    if is_postgres(session):
        raw = session.connection().connection.driver_connection
        with raw.cursor() as cur:
            with cur.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
        return count
    chunk: list[dict] = []
    stmt = table.insert()
    for row in rows:
        chunk.append(dict(zip(columns, row)))
        if len(chunk) >= 5000:
            session.execute(stmt, chunk)
            count += len(chunk)
            chunk = []
    if chunk:
        session.execute(stmt, chunk)
        count += len(chunk)
    return count


def _progress_insert(postgres: bool, table: str, kind: str, extra_cols: str = "", extra_vals: str = "") -> str:
    """SQL that derives one kind of progress rows from the assignments, ordered by time."""
    if postgres:
        at = "a.started_at + make_interval(secs => i.position * ({step}))"
    else:
        at = "datetime(a.started_at, '+' || (i.position * ({step})) || ' seconds')"
    step = f"{STEP_MIN_S} + (CAST(a.user_id AS BIGINT) * 7919) % {STEP_SPAN_S}"
    at = at.format(step=step)
    return (
        f"INSERT INTO {table} (course_id, user_id, item_id, attempt, recorded_at{extra_cols}) "
        f"SELECT a.course_id, a.user_id, i.id, 1, {at} AS t{extra_vals} "
        f"FROM course_assignments a JOIN course_items i ON i.course_id = a.course_id "
        f"WHERE a.course_id = :course_id AND i.kind = '{kind}' AND i.position < a.items_done "
        f"ORDER BY t"
    )


def seed(
    session: Session,
    learners: int,
    lessons: int = 20,
    courses: int = 1,
    completed_ratio: float = 0.3,
    in_progress_ratio: float = 0.4,
    random_seed: int | None = None,
    now: datetime | None = None,
) -> SeedResult:
    """Create one organization with an admin, ``learners`` learners and ``courses`` courses.

    Every learner is assigned to every course; ``completed_ratio`` of them have
    completed it (with a completion and a certificate), ``in_progress_ratio``
    are part-way, the rest have not started. About one in ten has
    course-assigned notifications off. Does not commit.
    """
    if learners < 1:
        raise ValidationFailed(f"--learners must be at least 1, got {learners}")
    if lessons < 1:
        raise ValidationFailed(f"--lessons must be at least 1, got {lessons}")
    if courses < 1:
        raise ValidationFailed(f"--courses must be at least 1, got {courses}")
    if not 0.0 <= completed_ratio <= 1.0:
        raise ValidationFailed(f"--completed-ratio must be between 0 and 1, got {completed_ratio}")
    in_progress_ratio = min(in_progress_ratio, 1.0 - completed_ratio)
    rng = random.Random(random_seed)
    now = now or datetime.now(timezone.utc)
    postgres = is_postgres(session)

    org = create_organization(session, f"Organization {rng.randrange(10**6):06d}")
    admin = create_user(session, org.id, "Admin", f"admin.org{org.id}@example.com",
                        (PERMISSION_USERS, PERMISSION_TRAINING), notify_course_assigned=True)
    users_t = User.__table__
    bulk_insert(
        session, users_t, ("organization_id", "name", "email", "permissions", "notify_course_assigned", "created_at"),
        ((org.id, f"Learner {n}", f"learner{n}.org{org.id}@example.com", "",
          rng.random() >= NOTIFY_OFF_RATIO or n == 0, now) for n in range(learners)),
    )
    learner_ids = session.scalars(
        select(users_t.c.id).where(users_t.c.organization_id == org.id, users_t.c.id != admin.id)
        .order_by(users_t.c.id)
    ).all()

    items = [("lesson", f"Lesson {n + 1}") for n in range(lessons)] + list(EXTRA_ITEMS)
    total_items = len(items)
    course_ids: list[int] = []
    for c in range(courses):
        course = create_course(session, org.id, f"Safety procedure {c + 1}", items, certificates_enabled=True)
        course_ids.append(course.id)

        def assignment_rows(course_id=course.id):
            for n, uid in enumerate(learner_ids):
                roll = rng.random()
                if n == 0 or roll < completed_ratio:
                    status, done = AssignmentStatus.COMPLETED, total_items
                elif roll < completed_ratio + in_progress_ratio:
                    status, done = AssignmentStatus.IN_PROGRESS, rng.randint(1, total_items - 1)
                else:
                    yield (course_id, uid, AssignmentStatus.NOT_STARTED, 0.0, 0, None, None, None, 1, now)
                    continue
                step = _step(uid)
                started = now - timedelta(seconds=total_items * step + rng.randrange(300 * 86400))
                completed = started + timedelta(seconds=(total_items - 1) * step) if status == AssignmentStatus.COMPLETED else None
                pct = 100.0 if status == AssignmentStatus.COMPLETED else round(100.0 * done / total_items, 2)
                # The one assessment sits at position ``lessons``; its score is the course score.
                score = _score(uid) if status == AssignmentStatus.COMPLETED else None
                yield (course_id, uid, status, pct, done, score, started, completed, 1, started)

        bulk_insert(
            session, CourseAssignment.__table__,
            ("course_id", "user_id", "status", "progress_pct", "items_done", "score", "started_at",
             "completed_at", "attempt", "assigned_at"),
            assignment_rows(),
        )
        params = {"course_id": course.id}
        session.execute(text(_progress_insert(postgres, "lesson_progress", "lesson")), params)
        session.execute(text(_progress_insert(
            postgres, "assessment_results", "practical_assessment", ", score, passed",
            ", 50 + (a.user_id * 31) % 51, true")), params)
        session.execute(text(_progress_insert(
            postgres, "discussion_posts", "discussion", ", body", ", 'My notes on the procedure'")), params)
        session.execute(text(_progress_insert(postgres, "assignment_submissions", "assignment")), params)
        session.execute(text(
            "INSERT INTO course_completions (course_id, user_id, attempt, status, score, progress_pct, completed_at) "
            "SELECT course_id, user_id, 1, 'completed', score, 100.0, completed_at FROM course_assignments "
            "WHERE course_id = :course_id AND status = 'completed' ORDER BY completed_at"), params)
        session.execute(text(
            "INSERT INTO certificates (course_id, user_id, attempt, number, issued_at) "
            "SELECT course_id, user_id, 1, 'S' || course_id || '-' || user_id || '-1', completed_at "
            "FROM course_assignments WHERE course_id = :course_id AND status = 'completed' ORDER BY completed_at"),
            params)
        analytics.recompute_course_analytics(session, course.id)

    if postgres:
        for table in ("users", "course_assignments", "lesson_progress", "assessment_results", "discussion_posts",
                      "assignment_submissions", "course_completions", "certificates"):
            session.execute(text(f"ANALYZE {table}"))
    # Sanity: the item layout the SQL above relies on.
    assert session.scalar(select(CourseItem.kind).where(CourseItem.course_id == course_ids[0],
                                                        CourseItem.position == lessons)) == "practical_assessment"
    return SeedResult(org.id, admin.id, learner_ids[0], course_ids, len(learner_ids))
