"""Closing a job once its batches have finished: exact analytics, totals, final state, audit.

A running job ends ``succeeded``, or ``failed`` naming its dead-lettered batches; a cancelling
one is closed by :func:`tasks.resets.cancelling.finalize_cancelled` once nothing is in flight.
The job's last unit finalizes it in its own task (:func:`finalize_or_publish`); the
``resets.finalize`` task does the same for a cancel and for the sweep.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import analytics
from models.db import session_scope
from models.job_ids import job_uuid
from models.logs import log_event
from models.messaging import send_now
from models.schema import ResetJob
from models.states import FINISHED_BATCH_STATES, JobState
from models.times import utcnow
from models.tracing import job_span
from tasks.base import DATABASE_UNAVAILABLE
from tasks.resets.cancelling import finalize_cancelled
from tasks.resets.progress import close_job, job_totals
from tasks.resets.tables import batches, jobs
from tasks.resets.wakeups import FINALIZE_TASK

# The span of a job's finalize in its trace.
FINALIZE_SPAN = "resets.finalize"


@dataclass
class FinalizeResult:
    finished: bool
    state: str
    drift: dict | None = None


def finalize_job(session: Session, job_id: str | uuid.UUID, now: datetime | None = None) -> FinalizeResult:
    """Close a job whose batches have all finished: exact analytics, totals, final state, audit.

    Recomputes the course's analytics from the rows (logging any drift it
    corrects). A job with a dead-lettered batch ends ``failed`` naming it.
    Does nothing for a job that is not running or still has unfinished batches.
    Safe to run twice.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    if session.scalar(select(jobs.c.state).where(jobs.c.id == key)) == JobState.CANCELLING:
        # One lock order everywhere: batch rows before the job row, as a batch or purge step
        # takes them. Waiting here also lets a batch in flight commit (and count) first.
        session.execute(select(batches.c.batch_no).where(batches.c.job_id == key)
                        .order_by(batches.c.batch_no).with_for_update())
    job = session.execute(
        select(ResetJob).where(ResetJob.id == key).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if job is None:
        return FinalizeResult(False, "missing")
    if job.state == JobState.CANCELLING:
        return FinalizeResult(finalize_cancelled(session, job, now), job.state)
    if job.state != JobState.RUNNING:
        return FinalizeResult(False, job.state)
    unfinished = session.scalar(
        select(func.count()).select_from(batches)
        .where(batches.c.job_id == key, batches.c.state.not_in(FINISHED_BATCH_STATES))
    )
    if unfinished:
        return FinalizeResult(False, job.state)

    exact, previous = analytics.recompute_course_analytics(session, job.course_id)
    drift = None
    if previous is not None and previous != exact:
        drift = {"before": previous.as_dict(), "exact": exact.as_dict()}
        log_event("reset.analytics.drift", logging.WARNING, job_id=str(key), course_id=job.course_id, **drift)

    cleared, learners_done, dead = job_totals(session, key)
    if job.learners_total != learners_done:
        # Learners started, were removed or were reset by another path while the job ran.
        log_event("reset.targets.changed", job_id=str(key), planned=job.learners_total, reset=learners_done)
        job.learners_total = learners_done
    if dead:
        first_no, first_error = dead[0]
        job.error = (f"batch {first_no} {first_error}" if len(dead) == 1
                     else f"{len(dead)} batches dead-lettered; first: batch {first_no} {first_error}")
    close_job(session, job, JobState.FAILED if dead else JobState.SUCCEEDED, now, cleared, learners_done,
              actor_id=job.actor_id)
    log_event("reset.job.finished", job_id=str(key), state=job.state, learners=learners_done, cleared=cleared)
    return FinalizeResult(True, job.state, drift)


def finalize_now(job_id: str) -> FinalizeResult:
    """:func:`finalize_job` in its own transaction (the ``resets.finalize`` task), in a span of the
    job's trace (models/tracing.py)."""
    with job_span(FINALIZE_SPAN, job_id=job_id), session_scope() as session:
        return finalize_job(session, job_id)


def finalize_or_publish(job_id: str) -> None:
    """Finalize now (the job's last unit just committed). If the database is unreachable, leave it
    to a ``resets.finalize`` message: a retry of the calling task would find its unit done and
    not finalize."""
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE:
        send_now(FINALIZE_TASK, [job_id])
