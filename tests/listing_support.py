"""Helpers for listing tests: reset-job rows written in bulk (fast), bypassing the request flow."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import insert
from sqlalchemy.orm import Session

from models.schema import ResetJob
from models.times import utcnow

STATES = ("succeeded", "failed", "cancelled", "expired")


def insert_jobs(session: Session, organization_id: int, course_id: int, actor_id: int, count: int, *,
                start: datetime | None = None, step: timedelta = timedelta(seconds=1), same_instant: int = 3,
                origin: str = "bulk") -> list[uuid.UUID]:
    """``count`` finished jobs, oldest first, ``same_instant`` sharing each created_at (ties broken by id)."""
    start = start or utcnow() - timedelta(days=30)
    rows = []
    for i in range(count):
        rows.append(dict(
            id=uuid.uuid4(), organization_id=organization_id, course_id=course_id, learner_id=None, scope="course",
            state=STATES[i % len(STATES)], actor_id=actor_id, reason="bulk", origin=origin, params_hash="",
            summary={}, created_at=start + step * (i // max(1, same_instant)), learners_total=0, learners_done=0,
            batches_total=0, batches_done=0, batches_dead=0, purge_total=0, purge_done=0, cleared={},
            watermarks={},
        ))
    for chunk in range(0, len(rows), 5000):
        session.execute(insert(ResetJob), rows[chunk:chunk + 5000])
    return [r["id"] for r in rows]
