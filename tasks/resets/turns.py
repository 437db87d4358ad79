"""Fair turns: which queued job starts next and which unit of work runs next (decision record 0005).

Work is claimed from the database, not taken in broker order. A ``resets.start`` message starts
whichever queued job is next in turn, and a ``resets.work`` message runs whichever runnable unit
(learner batch or purge chunk) is next in turn, so a long queue of one organization's messages
never stands in front of another's work: organizations take turns (least recently served first),
and within one organization its jobs take turns round-robin in ``(created_at, id)`` order. Only
the picker writes ``organization_turns``, so a claim never locks a ``reset_jobs`` row.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from models.dialect import insert
from models.job_ids import job_uuid
from models.schema import ResetJob
from models.states import BatchKind, BatchState, JobScope, JobState
from models.times import as_utc, utcnow
from tasks.resets.learner_batch import ClaimResult, claim_batch
from tasks.resets.tables import batches, jobs, turns


def _turn_order(j, t):
    """ORDER BY terms: least recently served organization first, then the organization's
    next job after the last one served (round-robin), then the oldest."""
    after_last = tuple_(j.c.created_at, j.c.id) > tuple_(t.c.job_created_at, t.c.job_id)
    return [t.c.turn_at.is_not(None), t.c.turn_at, case((after_last, 0), else_=1), j.c.created_at, j.c.id]


def _runnable(b, now: datetime):
    """A ``pending`` batch, or a ``running`` one whose lease ran out (its worker is gone, or it
    waits out a backoff)."""
    return or_(b.c.state == BatchState.PENDING, and_(b.c.state == BatchState.RUNNING, b.c.lease_expires_at < now))


def take_turn(session: Session, job: ResetJob, now: datetime) -> None:
    """Record that ``job``'s organization (and, within it, ``job``) was just served."""
    stmt = insert(session, turns).values(organization_id=job.organization_id, turn_at=now,
                                         job_created_at=job.created_at, job_id=job.id)
    session.execute(stmt.on_conflict_do_update(
        index_elements=[turns.c.organization_id],
        set_={"turn_at": stmt.excluded.turn_at, "job_created_at": stmt.excluded.job_created_at,
              "job_id": stmt.excluded.job_id},
    ))


def next_queued_job(session: Session) -> uuid.UUID | None:
    """The queued job whose turn it is, locked (``SKIP LOCKED``: concurrent starters take different ones)."""
    j = jobs.alias("j")
    stmt = (select(j.c.id).select_from(j.outerjoin(turns, turns.c.organization_id == j.c.organization_id))
            .where(j.c.state == JobState.QUEUED).order_by(*_turn_order(j, turns)).limit(1)
            .with_for_update(of=j, skip_locked=True))
    return session.scalar(stmt)


@dataclass
class UnitClaim:
    """A unit of work claimed by :func:`claim_next_unit`, to run in its own transaction."""

    job_id: str
    batch_no: int
    kind: str  # BatchKind
    claim: ClaimResult
    traceparent: str | None = None  # the job's trace (models/tracing.py)
    organization_id: int | None = None
    waited_seconds: float | None = None  # runnable to claimed (None: its own message took it back)


def claim_next_unit(session: Session, max_attempts: int, lease_seconds: int, now: datetime | None = None,
                    owner: str | None = None) -> UnitClaim | None:
    """Claim the runnable unit of a running course-wide job whose turn it is; None when there is none.

    The batch row is locked with ``SKIP LOCKED``, its lease taken (a learner batch also counts an
    attempt, :func:`claim_batch`), and the turn recorded, all in the caller's transaction: commit
    it before running the unit.

    ``owner`` (the claiming message's id) is written on the batch. The same message delivered
    again, because the worker running it died or the task is retried, first takes back the batch
    it still holds, lease or not, so its unit never waits for the lease to run out.
    """
    now = now or utcnow()
    b = batches.alias("b")
    j = jobs.alias("j")
    row = None
    runnable_since = None
    if owner is not None:
        row = session.execute(
            select(b.c.job_id, b.c.batch_no, b.c.kind).select_from(b.join(j, j.c.id == b.c.job_id))
            .where(b.c.state == BatchState.RUNNING, b.c.claimed_by == owner, j.c.state == JobState.RUNNING).limit(1)
            .with_for_update(of=b, skip_locked=True)
        ).first()
    if row is None:
        # Runnable since it was published (planned, released, back between purge chunks), or since
        # its lease ran out (a backoff, a worker gone).
        since = case((b.c.state == BatchState.RUNNING, b.c.lease_expires_at), else_=b.c.published_at)
        row = session.execute(
            select(b.c.job_id, b.c.batch_no, b.c.kind, since)
            .select_from(b.join(j, j.c.id == b.c.job_id)
                         .outerjoin(turns, turns.c.organization_id == j.c.organization_id))
            .where(_runnable(b, now), j.c.state == JobState.RUNNING, j.c.scope == JobScope.COURSE)
            .order_by(*_turn_order(j, turns), b.c.batch_no).limit(1)
            .with_for_update(of=b, skip_locked=True)
        ).first()
        if row is not None:
            row, runnable_since = row[:3], row[3]
    if row is None:
        return None
    key, batch_no, kind = row
    job = session.get(ResetJob, key)
    take_turn(session, job, now)
    waited = None if runnable_since is None else max(0.0, (now - as_utc(runnable_since)).total_seconds())
    seen = dict(traceparent=job.traceparent, organization_id=job.organization_id, waited_seconds=waited)
    if kind == BatchKind.PURGE:  # a purge chunk counts an attempt only when it fails (fail_purge_step)
        session.execute(update(batches).where(batches.c.job_id == key, batches.c.batch_no == batch_no).values(
            state=BatchState.RUNNING, claimed_at=now, claimed_by=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds)))
        return UnitClaim(str(key), int(batch_no), kind, ClaimResult(True), **seen)
    return UnitClaim(str(key), int(batch_no), kind,
                     claim_batch(session, key, batch_no, max_attempts, lease_seconds, now, owner=owner), **seen)


def runnable_units(session: Session, job_id: str | uuid.UUID | None = None, now: datetime | None = None,
                   owner: str | None = None) -> int:
    """How many units of running course-wide jobs could be claimed now (all jobs, or one).

    A plain read: rows locked by another transaction count too. With ``owner``, the running
    units that message claimed count as well (its redelivery would take them back).
    """
    now = now or utcnow()
    runnable = _runnable(batches, now)
    if owner is not None:
        runnable = or_(runnable, and_(batches.c.state == BatchState.RUNNING, batches.c.claimed_by == owner))
    stmt = (select(func.count()).select_from(batches.join(jobs, jobs.c.id == batches.c.job_id))
            .where(runnable, jobs.c.state == JobState.RUNNING, jobs.c.scope == JobScope.COURSE))
    if job_id is not None:
        stmt = stmt.where(batches.c.job_id == job_uuid(job_id))
    return int(session.scalar(stmt) or 0)
