"""The tables every reset step writes, and the batch row lock each step takes first."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.schema import CourseAssignment, OrganizationTurn, ResetBatch, ResetJob

assignments = CourseAssignment.__table__
batches = ResetBatch.__table__
jobs = ResetJob.__table__
turns = OrganizationTurn.__table__


def lock_batch(session: Session, key: uuid.UUID, batch_no: int) -> ResetBatch | None:
    """The batch row, locked: a concurrent duplicate of the same unit waits here, then finds it done."""
    return session.execute(
        select(ResetBatch).where(ResetBatch.job_id == key, ResetBatch.batch_no == batch_no)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
