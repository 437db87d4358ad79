"""Course analytics: per-course aggregates kept exact at every commit.

Writers apply *deltas* (one UPDATE of the course's row in the same transaction
as the change); :func:`recompute_course_analytics` rebuilds the row from
``course_assignments`` and is the definition the deltas must agree with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import case, func, literal_column, select, update
from sqlalchemy.orm import Session

from models.schema import CourseAnalytics, CourseAssignment
from models.states import AssignmentStatus


@dataclass(frozen=True)
class AnalyticsRow:
    assigned: int
    not_started: int
    in_progress: int
    completed: int
    completion_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


def _rate_sql(completed, assigned):
    """Completed learners as a percentage of assigned ones, 4 decimals, 0 when none.

    Computed in SQL everywhere (deltas and recomputation) so both agree exactly.
    """
    return case((assigned > 0, func.round(literal_column("100.0") * completed / assigned, 4)), else_=0.0)


def ensure_analytics_row(session: Session, course_id: int) -> None:
    """Create the course's analytics row if it is missing (new course)."""
    if session.get(CourseAnalytics, course_id) is None:
        session.add(CourseAnalytics(course_id=course_id, updated_at=datetime.now(timezone.utc)))
        session.flush()


def apply_delta(
    session: Session,
    course_id: int,
    *,
    assigned: int = 0,
    not_started: int = 0,
    in_progress: int = 0,
    completed: int = 0,
) -> None:
    """Shift the course's counters by the given amounts, in the caller's transaction.

    The completion rate is recomputed from the new counters in the same
    statement, so the row is consistent whatever else commits around it.
    """
    if not any((assigned, not_started, in_progress, completed)):
        return
    t = CourseAnalytics.__table__
    new_assigned = t.c.assigned + assigned
    new_completed = t.c.completed + completed
    session.execute(
        update(t)
        .where(t.c.course_id == course_id)
        .values(
            assigned=new_assigned,
            not_started=t.c.not_started + not_started,
            in_progress=t.c.in_progress + in_progress,
            completed=new_completed,
            completion_rate=_rate_sql(new_completed, new_assigned),
            updated_at=datetime.now(timezone.utc),
        )
    )


def status_delta(old_status: str | None, new_status: str | None) -> dict[str, int]:
    """The counter changes for one learner moving from ``old_status`` to ``new_status``."""
    delta = {"assigned": 0, "not_started": 0, "in_progress": 0, "completed": 0}
    if old_status == new_status:
        return delta
    if old_status is None:
        delta["assigned"] += 1
    else:
        delta[old_status] -= 1
    if new_status is None:
        delta["assigned"] -= 1
    else:
        delta[new_status] += 1
    return delta


def count_from_rows(session: Session, course_id: int) -> AnalyticsRow:
    """The analytics as a recomputation from ``course_assignments`` (one indexed scan)."""
    a = CourseAssignment.__table__
    counts = (
        select(
            func.count().label("assigned"),
            func.coalesce(func.sum(case((a.c.status == AssignmentStatus.NOT_STARTED, 1), else_=0)), 0).label("not_started"),
            func.coalesce(func.sum(case((a.c.status == AssignmentStatus.IN_PROGRESS, 1), else_=0)), 0).label("in_progress"),
            func.coalesce(func.sum(case((a.c.status == AssignmentStatus.COMPLETED, 1), else_=0)), 0).label("completed"),
        )
        .where(a.c.course_id == course_id)
        .subquery()
    )
    row = session.execute(
        select(
            counts.c.assigned,
            counts.c.not_started,
            counts.c.in_progress,
            counts.c.completed,
            _rate_sql(counts.c.completed, counts.c.assigned),
        )
    ).one()
    return AnalyticsRow(int(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4]))


def read_analytics(session: Session, course_id: int) -> AnalyticsRow | None:
    row = session.get(CourseAnalytics, course_id, populate_existing=True)
    if row is None:
        return None
    return AnalyticsRow(row.assigned, row.not_started, row.in_progress, row.completed, float(row.completion_rate))


def recompute_course_analytics(session: Session, course_id: int) -> tuple[AnalyticsRow, AnalyticsRow | None]:
    """Rebuild the course's analytics row from the rows; returns ``(exact, previous)``.

    Safe to run any number of times. The caller compares the two to log drift.
    """
    ensure_analytics_row(session, course_id)
    t = CourseAnalytics.__table__
    # Lock the row so concurrent deltas queue behind the recomputation.
    session.execute(select(t.c.course_id).where(t.c.course_id == course_id).with_for_update())
    previous = read_analytics(session, course_id)
    exact = count_from_rows(session, course_id)
    session.execute(
        update(t)
        .where(t.c.course_id == course_id)
        .values(**exact.as_dict(), updated_at=datetime.now(timezone.utc))
    )
    session.expire_all()
    return exact, previous
