"""The floor: the same clearing as a course-wide reset, done as one set-based SQL transaction.

Every component of the reset registry, the assignments, the analytics and the
notification rows, for the learners a reset would target, in one transaction.
This is what the database itself needs for the work; the benchmark divides the
system's end-to-end time by it.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.components import RESET_COMPONENTS


def run_floor(session: Session, course_id: int) -> dict:
    """Clear the course in one transaction (the caller commits); returns rows per component and seconds."""
    started = time.perf_counter()
    params = {"c": course_id, "job": uuid.uuid4()}
    session.execute(text(
        "CREATE TEMP TABLE floor_targets ON COMMIT DROP AS "
        "SELECT user_id, status FROM course_assignments WHERE course_id = :c AND status <> 'not_started'"
    ), params)
    cleared = {}
    for component in RESET_COMPONENTS:
        result = session.execute(text(
            f"DELETE FROM {component.table.name} WHERE course_id = :c "
            "AND user_id IN (SELECT user_id FROM floor_targets)"), params)
        cleared[component.name] = result.rowcount
    session.execute(text(
        "UPDATE course_assignments a SET status = 'not_started', progress_pct = 0, items_done = 0, score = NULL, "
        "started_at = NULL, completed_at = NULL, attempt = a.attempt + 1, last_reset_job_id = :job "
        "FROM floor_targets t WHERE a.course_id = :c AND a.user_id = t.user_id"), params)
    session.execute(text(
        "INSERT INTO notifications (user_id, course_id, reset_job_id, kind, status, attempts, created_at) "
        "SELECT u.id, :c, :job, 'course_assigned', 'pending', 0, now() FROM users u "
        "JOIN floor_targets t ON t.user_id = u.id WHERE u.notify_course_assigned "
        "ON CONFLICT DO NOTHING"), params)
    session.execute(text(
        "UPDATE course_analytics SET not_started = assigned, in_progress = 0, completed = 0, completion_rate = 0 "
        "WHERE course_id = :c"), params)
    return {"cleared": cleared, "seconds": time.perf_counter() - started}
