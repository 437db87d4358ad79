"""Closing a job once its batches have finished: exact analytics, totals, final state, audit.

A running job ends ``succeeded``, or ``failed`` naming its dead-lettered batches. A cancelling
job is closed once no batch is in flight: the pre-job rows of the learners it did reset are
cleared (the purge may not have reached them), and the audit event counts the learners it
really reset.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models import analytics
from models.components import RESET_COMPONENTS
from models.jobs import record_audit, utcnow
from models.logs import log_event
from models.schema import ResetJob
from models.states import FINISHED_BATCH_STATES, BatchKind, BatchState, JobState
from tasks.reset_steps.purge import purge_reset_learners
from tasks.reset_steps.rows import batches, job_uuid, jobs


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
        return _finalize_cancelled(session, job, now)
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

    cleared, learners_done, dead = _totals(session, key)
    if job.learners_total != learners_done:
        # Learners started, were removed or were reset by another path while the job ran.
        log_event("reset.targets.changed", job_id=str(key), planned=job.learners_total, reset=learners_done)
        job.learners_total = learners_done
    if dead:
        first_no, first_error = dead[0]
        job.error = (f"batch {first_no} {first_error}" if len(dead) == 1
                     else f"{len(dead)} batches dead-lettered; first: batch {first_no} {first_error}")
    _close(session, job, JobState.FAILED if dead else JobState.SUCCEEDED, now, cleared, learners_done,
           actor_id=job.actor_id)
    log_event("reset.job.finished", job_id=str(key), state=job.state, learners=learners_done, cleared=cleared)
    return FinalizeResult(True, job.state, drift)


def _totals(session: Session, key: uuid.UUID) -> tuple[dict[str, int], int, list[tuple[int, str]]]:
    """Rows cleared per component, learners reset and dead batches, summed over the job's batch rows."""
    cleared: dict[str, int] = {c.name: 0 for c in RESET_COMPONENTS}
    learners_done = 0
    dead = []
    for row in session.execute(
        select(batches.c.batch_no, batches.c.state, batches.c.cleared, batches.c.learners_reset, batches.c.error)
        .where(batches.c.job_id == key).order_by(batches.c.batch_no)
    ):
        learners_done += row.learners_reset
        for name, count in (row.cleared or {}).items():
            cleared[name] = cleared.get(name, 0) + int(count)
        if row.state == BatchState.DEAD:
            dead.append((row.batch_no, row.error))
    return cleared, learners_done, dead


def _close(session: Session, job: ResetJob, state: JobState, now: datetime, cleared: dict[str, int],
           learners_done: int, actor_id: int) -> None:
    """The final state with its totals, and its audit event (``reset.<state>``) in the same transaction."""
    job.cleared = cleared
    job.learners_done = learners_done
    job.state = state
    job.finished_at = now
    job.heartbeat_at = now
    job.finalized_at = now
    record_audit(
        session, f"reset.{state}", job.organization_id, actor_id=actor_id, course_id=job.course_id,
        learner_id=job.learner_id, job_id=job.id, campaign_id=job.campaign_id, learner_count=learners_done,
        reason=job.reason, origin=job.origin,
    )
    session.flush()


def _finalize_cancelled(session: Session, job: ResetJob, now: datetime) -> FinalizeResult:
    """Once no batch is in flight: clear what the purge did not reach for reset learners, exact
    analytics, state ``cancelled``, and the audit event with the true number of learners reset.

    A learner batch still ``running`` under a live lease is in flight (its own transaction holds
    its row, or it is about to start and will find the job cancelling): wait for it. One whose
    lease ran out lost its worker; its work rolled back with it, so it is cancelled here.
    """
    in_flight = session.scalar(select(func.count()).select_from(batches).where(
        batches.c.job_id == job.id, batches.c.state == BatchState.RUNNING, batches.c.kind == BatchKind.LEARNERS,
        or_(batches.c.lease_expires_at.is_(None), batches.c.lease_expires_at >= now)))
    if in_flight:
        return FinalizeResult(False, job.state)
    session.execute(update(batches).where(batches.c.job_id == job.id, batches.c.state.in_(
        (BatchState.WAITING, BatchState.PENDING, BatchState.RUNNING))).values(
        state=BatchState.CANCELLED, finished_at=now, lease_expires_at=None))
    extra = purge_reset_learners(session, job)
    analytics.recompute_course_analytics(session, job.course_id)
    cleared, learners_done, _dead = _totals(session, job.id)
    for name, count in extra.items():
        cleared[name] = cleared.get(name, 0) + count
    _close(session, job, JobState.CANCELLED, now, cleared, learners_done, actor_id=job.cancelled_by or job.actor_id)
    log_event("reset.job.cancelled", job_id=str(job.id), learners=learners_done, cleared=cleared)
    return FinalizeResult(True, job.state)
