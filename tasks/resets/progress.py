"""The job's progress: counting finished units on the job row, releasing the purge, the totals.

Every finished unit is counted on the job row in the unit's own transaction (serialised on
that row), so the counters are exact at every commit. The learner batch that finishes the
learner phase releases the job's purge batches; the job's totals are summed from its batch
rows when it closes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.audit import record_audit
from models.components import RESET_COMPONENTS
from models.schema import ResetJob
from models.states import BatchKind, BatchState, JobState
from tasks.resets.tables import batches, jobs


@dataclass
class PhaseProgress:
    job_complete: bool = False
    # Purge batches released by this commit: (batch_no, cursor).
    purge: list[tuple[int, int]] = field(default_factory=list)
    job_state: str = JobState.RUNNING


def release_purge(session: Session, job_key: uuid.UUID, now: datetime) -> list[tuple[int, int]]:
    """The learner phase is over: make the job's purge batches runnable; returns (batch_no, cursor) of each."""
    rows = session.execute(
        update(batches).where(batches.c.job_id == job_key, batches.c.kind == BatchKind.PURGE,
                              batches.c.state == BatchState.WAITING)
        .values(state=BatchState.PENDING, published_at=now)
        .returning(batches.c.batch_no, batches.c.cursor_row_id)
    ).all()
    return [(int(no), int(cursor)) for no, cursor in rows]


def count_learner_batch(session: Session, key: uuid.UUID, now: datetime, learners: int,
                        dead: bool = False) -> PhaseProgress:
    """Count a finished learner batch on the job; the last one releases the purge (or completes the job)."""
    values = {"heartbeat_at": now, "learners_done": jobs.c.learners_done + learners}
    if dead:
        values["batches_dead"] = jobs.c.batches_dead + 1
    else:
        values["batches_done"] = jobs.c.batches_done + 1
    done, dead_n, total, purge_total, state = session.execute(
        update(jobs).where(jobs.c.id == key).values(**values)
        .returning(jobs.c.batches_done, jobs.c.batches_dead, jobs.c.batches_total, jobs.c.purge_total, jobs.c.state)
    ).one()
    if done + dead_n < total:
        return PhaseProgress(job_state=state)
    if purge_total and state == JobState.RUNNING:
        return PhaseProgress(purge=release_purge(session, key, now), job_state=state)
    return PhaseProgress(job_complete=True, job_state=state)


def count_purge_finished(session: Session, key: uuid.UUID, now: datetime, dead: bool = False) -> bool:
    """Count a finished purge batch on the job; True when it was the job's last."""
    values = {"heartbeat_at": now, "purge_done": jobs.c.purge_done + 1}
    if dead:
        values["batches_dead"] = jobs.c.batches_dead + 1
    done, total = session.execute(
        update(jobs).where(jobs.c.id == key).values(**values).returning(jobs.c.purge_done, jobs.c.purge_total)
    ).one()
    return done >= total


def job_totals(session: Session, key: uuid.UUID) -> tuple[dict[str, int], int, list[tuple[int, str]]]:
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


def close_job(session: Session, job: ResetJob, state: JobState, now: datetime, cleared: dict[str, int],
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
