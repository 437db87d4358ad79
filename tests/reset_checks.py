"""Checks of a finished reset against SQL recomputation (R4-R9), shared by the pipeline and fault tests.

``snapshot`` records, per (course, learner), the attempt, status and rows per
component before a reset; ``assert_reset_exact`` compares the database after
the job with what the rules say it must be.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from models import analytics
from models.components import RESET_COMPONENTS
from models.schema import Base, CourseAssignment, Notification, User
from tasks.resets.finalize import finalize_job
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.purge import purge_step
from tasks.resets.start import start_job


@dataclass(frozen=True)
class LearnerState:
    attempt: int
    status: str
    last_reset_job_id: uuid.UUID | None
    rows: tuple[int, ...]  # per component, in RESET_COMPONENTS order


def snapshot(session: Session, course_ids: list[int]) -> dict[tuple[int, int], LearnerState]:
    a = CourseAssignment.__table__.c
    counts: dict[tuple[int, int], list[int]] = {}
    for i, component in enumerate(RESET_COMPONENTS):
        t = component.table
        for course_id, user_id, n in session.execute(
            select(t.c.course_id, t.c.user_id, func.count()).where(t.c.course_id.in_(course_ids))
            .group_by(t.c.course_id, t.c.user_id)
        ):
            counts.setdefault((course_id, user_id), [0] * len(RESET_COMPONENTS))[i] = n
    result = {}
    for row in session.execute(
        select(a.course_id, a.user_id, a.attempt, a.status, a.last_reset_job_id).where(a.course_id.in_(course_ids))
    ):
        key = (row.course_id, row.user_id)
        result[key] = LearnerState(row.attempt, row.status, row.last_reset_job_id,
                                   tuple(counts.get(key, [0] * len(RESET_COMPONENTS))))
    return result


def targeted(before: dict[tuple[int, int], LearnerState], course_id: int) -> set[int]:
    """Learners a course-wide reset applies to: those with progress (R6)."""
    return {u for (c, u), s in before.items() if c == course_id and s.status != "not_started"}


def assert_reset_exact(
    session: Session,
    before: dict[tuple[int, int], LearnerState],
    job_id: str,
    course_id: int,
    reset_ids: set[int],
) -> None:
    """Every learner in ``reset_ids`` reset exactly once by the job; nothing else touched; analytics exact."""
    session.expire_all()
    after = snapshot(session, sorted({c for c, _ in before}))
    job = uuid.UUID(job_id)
    zero = (0,) * len(RESET_COMPONENTS)
    for key, old in before.items():
        new = after[key]
        c, u = key
        if c == course_id and u in reset_ids:
            assert new.attempt == old.attempt + 1, f"learner {u}: attempt {old.attempt} -> {new.attempt}"
            assert new.last_reset_job_id == job, f"learner {u}: last reset job {new.last_reset_job_id}"
            assert new.status == "not_started", f"learner {u}: status {new.status}"
            assert new.rows == zero, f"learner {u}: rows left {new.rows}"
        else:
            assert new == old, f"{key} was touched: {old} -> {new}"
    # Analytics exact for every course involved.
    for c in {c for c, _ in before}:
        assert analytics.read_analytics(session, c) == analytics.count_from_rows(session, c), f"course {c} analytics"
    # Exactly one notification row per reset learner whose setting is on (R9), none for others.
    n = Notification.__table__.c
    rows = session.execute(select(n.user_id, func.count()).where(n.reset_job_id == job).group_by(n.user_id)).all()
    assert all(count == 1 for _, count in rows), "a learner has two notification rows"
    notified = {u for u, _ in rows}
    u = User.__table__.c
    wanted = set(session.scalars(select(u.id).where(u.id.in_(reset_ids), u.notify_course_assigned)).all()) \
        if reset_ids else set()
    assert notified == wanted, f"notified {len(notified)} vs wanted {len(wanted)}"


def fingerprint(session: Session) -> dict[str, object]:
    """Row counts of every table plus the job ledger's states: equal before and after a refusal."""
    session.flush()
    session.expire_all()
    result: dict[str, object] = {}
    for table in Base.metadata.sorted_tables:
        result[table.name] = session.scalar(select(func.count()).select_from(table))
    result["reset_jobs.states"] = sorted(
        (str(i), s, h or "") for i, s, h in session.execute(text("SELECT id, state, token_hash FROM reset_jobs"))
    )
    result["assignments.attempts"] = session.scalar(text("SELECT COALESCE(SUM(attempt), 0) FROM course_assignments"))
    return result


def drain_purge(session: Session, job_id: str, purge: list[tuple[int, int]], chunk_rows: int = 500) -> bool:
    """Run released purge batches step by step in-process, as ``resets.work`` wake-ups would."""
    complete = False
    for batch_no, cursor in purge:
        while True:
            step = purge_step(session, job_id, batch_no, chunk_rows, cursor=cursor)
            complete = complete or step.job_complete
            if step.status != "progressed":
                break
            cursor = step.cursor
    return complete


def run_job_in_process(session: Session, job_id: str, batch_size: int = 40, chunk_rows: int = 500):
    """Drive a queued job through every step with the plain functions; returns the finalize result."""
    start = start_job(session, job_id, batch_size, purge_partitions=3)
    for no in start.batch_nos:
        claim = claim_batch(session, job_id, no, max_attempts=5, lease_seconds=60)
        assert claim.runnable
        result = reset_batch(session, job_id, no)
        if result.purge:
            drain_purge(session, job_id, result.purge, chunk_rows)
    return finalize_job(session, job_id)
