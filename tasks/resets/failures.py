"""A unit that raised: record why, count it, hold it back, and dead-letter it when it keeps failing.

A learner batch counts its attempt when it is claimed (a worker killed by the batch still used
an attempt); a purge chunk counts one when it fails (:func:`fail_purge_step`). Either way a
failed unit is held back by :func:`unit_backoff_seconds`, the project's one backoff capped at a
minute, written as its lease (:func:`defer_unit`) and used as the countdown of the wake-up that
follows. The attempt limit (``RESET_BATCH_MAX_ATTEMPTS``) lives in the batch row, so a unit that
keeps failing is dead-lettered, not retried for ever.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from models.db import session_scope
from models.job_ids import job_uuid
from models.logs import log_event
from models.messaging import publish_after_commit
from models.settings import get_settings
from models.states import RUNNABLE_BATCH_STATES, BatchKind, BatchState
from models.times import utcnow
from tasks.backoff import backoff_seconds
from tasks.resets.progress import count_purge_finished
from tasks.resets.tables import batches
from tasks.resets.wakeups import FINALIZE_TASK, hand_on_turn

UNIT_BACKOFF_BASE_SECONDS = 1.0
UNIT_BACKOFF_MAX_SECONDS = 60.0


class BatchFailed(Exception):
    """A learner batch's transaction raised; its attempt stays counted and its error recorded."""

    def __init__(self, attempts: int):
        super().__init__(f"batch attempt {attempts} failed")
        self.attempts = attempts


def error_text(exc: BaseException) -> str:
    """``Type: first line`` of an exception, as a batch row keeps it."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def unit_backoff_seconds(attempts: int) -> float:
    """How long a unit that failed ``attempts`` times in a row is held back: the project's one backoff
    (:func:`tasks.backoff.backoff_seconds`), capped at a minute (well below the broker's visibility timeout)."""
    return backoff_seconds(attempts, UNIT_BACKOFF_BASE_SECONDS, UNIT_BACKOFF_MAX_SECONDS)


def record_batch_error(session: Session, job_id: str | uuid.UUID, batch_no: int, error: str) -> None:
    """Remember why an attempt failed (shown when the batch is dead-lettered)."""
    session.execute(
        update(batches).where(batches.c.job_id == job_uuid(job_id), batches.c.batch_no == batch_no)
        .values(error=error[:2000])
    )


@dataclass(frozen=True)
class PurgeFailure:
    dead: bool  # dead-lettered by this failure
    job_complete: bool  # and it was the job's last unfinished batch
    attempts: int  # failures in a row so far (0: the batch had already finished)


def fail_purge_step(
    session: Session, job_id: str | uuid.UUID, batch_no: int, error: str, max_attempts: int,
    now: datetime | None = None,
) -> PurgeFailure:
    """Count a failed purge step; dead-letter the batch after ``max_attempts`` failures in a row."""
    now = now or utcnow()
    key = job_uuid(job_id)
    mine = (batches.c.job_id == key) & (batches.c.batch_no == batch_no)
    attempts = session.scalar(
        update(batches).where(mine, batches.c.state.in_(RUNNABLE_BATCH_STATES))
        .values(attempts=batches.c.attempts + 1, error=error[:2000])
        .returning(batches.c.attempts)
    )
    if attempts is None or attempts < max_attempts:
        return PurgeFailure(False, False, attempts or 0)
    session.execute(update(batches).where(mine).values(
        state=BatchState.DEAD, error=f"dead-lettered after {attempts} attempts: {error[:1900]}", finished_at=now))
    log_event("reset.batch.dead", logging.ERROR, job_id=str(key), batch=batch_no, attempts=attempts,
              kind=BatchKind.PURGE)
    return PurgeFailure(True, count_purge_finished(session, key, now, dead=True), attempts)


def defer_unit(session: Session, job_id: str | uuid.UUID, batch_no: int, seconds: float,
               now: datetime | None = None) -> None:
    """A unit failed: no one picks it again for ``seconds`` (its lease becomes the backoff)."""
    now = now or utcnow()
    session.execute(
        update(batches).where(batches.c.job_id == job_uuid(job_id), batches.c.batch_no == batch_no,
                              batches.c.state.in_(RUNNABLE_BATCH_STATES))
        .values(state=BatchState.RUNNING, lease_expires_at=now + timedelta(seconds=seconds))
    )


def defer_failed_unit(job_id: str, batch_no: int, purge_error: str | None = None, attempts: int = 1) -> None:
    """A unit failed: hold it back for the unit backoff and publish a wake-up for then.

    A purge chunk's failure is counted here (``purge_error``) and may dead-letter it; a learner
    batch counted its attempt when it was claimed (``attempts``). If the database is unreachable
    this raises, and the calling task is retried under its own id (a ``resets.work`` takes its
    unit back).
    """
    with session_scope() as session:
        if purge_error is not None:
            failure = fail_purge_step(session, job_id, batch_no, purge_error, get_settings().batch_max_attempts)
            if failure.dead:
                if failure.job_complete:
                    publish_after_commit(session, FINALIZE_TASK, [job_id])
                return
            attempts = failure.attempts
        countdown = unit_backoff_seconds(attempts)
        defer_unit(session, job_id, batch_no, countdown)
    hand_on_turn(countdown)
