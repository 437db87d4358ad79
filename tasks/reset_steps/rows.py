"""What every step of the pipeline shares: the tables, job ids, the batch row lock, step outcomes."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.schema import CourseAssignment, OrganizationTurn, ResetBatch, ResetJob
from models.states import BatchState, JobState

MAX_USER_ID = 2**31 - 1

assignments = CourseAssignment.__table__
batches = ResetBatch.__table__
jobs = ResetJob.__table__
turns = OrganizationTurn.__table__


class Outcome(StrEnum):
    """What one step did (``BatchResult.status``, ``PurgeResult.status``); not stored."""

    DONE = "done"
    PROGRESSED = "progressed"  # a purge chunk: more rows of the batch remain
    SKIPPED = "skipped"  # a duplicate, or a batch no longer runnable
    CANCELLED = "cancelled"  # the job is being cancelled: the batch was marked cancelled
    FAILED = "failed"  # the step raised (reported by the tasks, which count and defer it)


def job_uuid(job_id: str | uuid.UUID) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def lock_batch(session: Session, key: uuid.UUID, batch_no: int) -> ResetBatch | None:
    """The batch row, locked: a concurrent duplicate of the same message waits here."""
    return session.execute(
        select(ResetBatch).where(ResetBatch.job_id == key, ResetBatch.batch_no == batch_no)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()


def running_job_or_cancel(session: Session, batch: ResetBatch, now: datetime) -> ResetJob | None:
    """The batch's job if it is still running; otherwise mark the batch cancelled and return None."""
    job = session.get(ResetJob, batch.job_id, populate_existing=True)
    if job.state == JobState.RUNNING:
        return job
    batch.state = BatchState.CANCELLED
    batch.finished_at = now
    session.flush()
    return None
