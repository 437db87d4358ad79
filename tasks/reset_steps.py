"""The reset pipeline's plain functions: plan, claim, reset a batch, finalize.

Each takes a ``Session`` and never commits or touches Celery; the thin tasks in
:mod:`tasks.resets` own the transactions and publish follow-ups after commit.
Every function is safe to run twice: idempotency lives in the database.

- A batch is a row ``(job_id, batch_no)`` over a keyset range of learner ids.
- Each learner's assignment records the last reset job applied to it, so a
  redelivered or re-planned batch skips learners it already reset.
- The batch's work, its ``done`` mark and the job's counters commit together.

Course-wide jobs over everyone assigned clear in two phases (decision record
0002). Progress rows are written over months, so one learner's rows lie
scattered across the table; deleting them learner batch by learner batch would
visit nearly every heap page once per batch. Instead:

1. *Learner batches* restart each learner's attempt (assignment, analytics,
   notification row) and clear only the rows newer than the job's watermark
   (activity recorded since the job started: few, found through the index).
2. *Purge batches*, released when every learner batch has finished, clear
   each component's rows at or below the watermark in id order, which is
   insertion order and so nearly physical order: each page is visited about
   once, as by one set-based statement.

Rows at or below the watermark exist only for learners who had progress when
the job started, and every such learner is targeted, so the purge needs no
join; learners of a dead-lettered batch are excluded by their id range.
One-learner jobs and audience-filtered jobs clear everything in their batch.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Integer,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from models import analytics
from models.components import RESET_COMPONENTS
from models.jobs import as_utc, record_audit, target_filter, utcnow
from models.logs import log_event
from models.schema import CourseAssignment, Notification, OrganizationTurn, ResetBatch, ResetJob, User

MAX_USER_ID = 2**31 - 1
FINISHED_BATCH_STATES = ("done", "dead", "cancelled")
CANCELLING = "cancelling"

assignments = CourseAssignment.__table__
batches = ResetBatch.__table__
jobs = ResetJob.__table__
turns = OrganizationTurn.__table__


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _in_ids(session: Session, column, ids: list[int], element_type=Integer):
    """``column IN ids``: one array parameter on PostgreSQL, an expanded list elsewhere."""
    if _is_postgres(session):
        return column == any_(bindparam(None, ids, type_=postgresql.ARRAY(element_type)))
    return column.in_(ids)


def _key_range(course_col, key_col, course_id: int, lo: int, hi: int):
    """``lo < key <= hi`` within one course: answered by the composite index on ``(course_id, key)``."""
    return and_(course_col == course_id, key_col > lo, key_col <= hi)


def job_uuid(job_id: str | uuid.UUID) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


# --- start: claim the job and plan its batches --------------------------------------------

@dataclass
class StartResult:
    started: bool
    scope: str | None = None
    batch_nos: list[int] = field(default_factory=list)
    purge_total: int = 0
    job_id: str | None = None


def plan_batches(session: Session, job: ResetJob, batch_size: int) -> list[int]:
    """Write every batch row of ``job`` (keyset ranges of learner ids, no OFFSET); return their numbers.

    As few batches as ``batch_size`` allows, of equal size (7,000 learners with
    batches of 5,000 make two of 3,500, which run side by side in the time of
    one). Boundaries are every n-th targeted learner id, read in one
    streaming window query, so a million learners never sit in memory. All
    rows are written before any batch is published.
    """
    a = assignments.c
    where = target_filter(job.course_id, job.learner_id, as_utc(job.completed_before))
    learners_total = session.scalar(select(func.count()).select_from(assignments).where(where)) or 0
    batch_count = max(1, -(-learners_total // batch_size))
    batch_size = max(1, -(-learners_total // batch_count))  # per batch, balanced
    ranked = select(a.user_id, func.row_number().over(order_by=a.user_id).label("rn")).where(where).subquery()
    boundaries = session.scalars(
        select(ranked.c.user_id).where(ranked.c.rn % batch_size == 0).order_by(ranked.c.user_id)
    ).all()
    rows = []
    lo = 0
    for hi in boundaries:
        rows.append({"job_id": job.id, "batch_no": len(rows) + 1, "lo_user_id": lo, "hi_user_id": hi})
        lo = hi
    if learners_total > len(boundaries) * batch_size or not rows:
        rows.append({"job_id": job.id, "batch_no": len(rows) + 1, "lo_user_id": lo, "hi_user_id": MAX_USER_ID})
    now = utcnow()
    for row in rows:
        row.update(state="pending", attempts=0, published_at=now, learners_reset=0, cleared={})
    session.execute(insert(batches), rows)
    session.execute(
        update(jobs).where(jobs.c.id == job.id).values(batches_total=len(rows), learners_total=learners_total)
    )
    return [row["batch_no"] for row in rows]


def uses_deferred_purge(job: ResetJob) -> bool:
    """Course-wide jobs over everyone assigned purge in id order; the others clear per batch."""
    return job.scope == "course" and job.completed_before is None


def plan_purge(session: Session, job: ResetJob, first_batch_no: int, partitions: int = 1,
               chunk_rows: int = 50000, min_rows: int = 0) -> int:
    """Record the watermarks and write the waiting purge batches of the components worth purging.

    A component whose earlier rows in the course number fewer than ``min_rows``
    (counted with a bounded probe of the ``(course_id, id)`` index) gets no
    watermark: the learner batches clear its rows directly, which costs less
    than a purge chain when the rows are few. The others get up to
    ``partitions`` disjoint id ranges, one per ``chunk_rows`` rows, that run
    in parallel (decision records 0002 and 0005).
    """
    watermarks: dict[str, int] = {}
    rows = []
    cap = max(min_rows, partitions * chunk_rows)

    def bounded_count(t):
        return select(func.count()).select_from(
            select(t.c.id).where(t.c.course_id == job.course_id).limit(cap).subquery()).scalar_subquery()

    # One round trip for every component's count; the rest only for components worth purging.
    counts = session.execute(select(*(bounded_count(c.table) for c in RESET_COMPONENTS))).one()
    for component, count in zip(RESET_COMPONENTS, counts):
        t = component.table
        count = int(count or 0)
        if count == 0 or count < min_rows:
            continue
        high = int(session.scalar(select(func.max(t.c.id))) or 0)
        watermarks[component.name] = high
        low, top = session.execute(select(func.min(t.c.id), func.max(t.c.id))
                                   .where(t.c.course_id == job.course_id, t.c.id <= high)).one()
        start = int(low) - 1
        span = int(top) - start
        parts = max(1, min(partitions, -(-count // max(1, chunk_rows)), span))
        for part in range(parts):
            lo = start + span * part // parts
            hi = high if part == parts - 1 else start + span * (part + 1) // parts
            rows.append({"job_id": job.id, "batch_no": first_batch_no + len(rows), "kind": "purge",
                         "component": component.name, "cursor_row_id": lo, "hi_row_id": hi,
                         "lo_user_id": 0, "hi_user_id": MAX_USER_ID, "state": "waiting", "attempts": 0,
                         "learners_reset": 0, "cleared": {}})
    if rows:
        session.execute(insert(batches), rows)
    session.execute(update(jobs).where(jobs.c.id == job.id).values(watermarks=watermarks, purge_total=len(rows)))
    return len(rows)


def start_job(session: Session, job_id: str | uuid.UUID, batch_size: int, now: datetime | None = None,
              purge_partitions: int = 1, purge_chunk_rows: int = 50000, purge_min_rows: int = 0) -> StartResult:
    """Claim a queued job (``queued`` -> ``running``) and plan all its batches.

    A second delivery finds the job no longer queued and does nothing.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    claimed = session.execute(
        update(jobs).where(jobs.c.id == key, jobs.c.state == "queued")
        .values(state="running", started_at=now, heartbeat_at=now)
    ).rowcount
    if claimed != 1:
        return StartResult(False)
    job = session.get(ResetJob, key, populate_existing=True)
    batch_nos = plan_batches(session, job, batch_size if job.scope == "course" else 1)
    purge_total = 0
    if uses_deferred_purge(job):
        purge_total = plan_purge(session, job, first_batch_no=len(batch_nos) + 1, partitions=purge_partitions,
                                 chunk_rows=purge_chunk_rows, min_rows=purge_min_rows)
    take_turn(session, job, now)
    log_event("reset.job.started", job_id=str(key), course_id=job.course_id, scope=job.scope,
              batches=len(batch_nos), purge_batches=purge_total)
    return StartResult(True, job.scope, batch_nos, purge_total, str(key))


# --- fair turns ------------------------------------------------------------------------------
#
# Work is claimed from the database, not taken in broker order (decision record 0005). A
# ``resets.start`` message starts whichever queued job is next in turn, and a ``resets.work``
# message runs whichever runnable unit (learner batch or purge chunk) is next in turn, so a
# long queue of one organization's messages never stands in front of another's work:
# organizations take turns (least recently served first), and within one organization its
# jobs take turns round-robin in (created_at, id) order.

def _turn_order(j, t):
    """ORDER BY terms: least recently served organization first, then the organization's
    next job after the last one served (round-robin), then the oldest."""
    after_last = tuple_(j.c.created_at, j.c.id) > tuple_(t.c.job_created_at, t.c.job_id)
    return [t.c.turn_at.is_not(None), t.c.turn_at, case((after_last, 0), else_=1), j.c.created_at, j.c.id]


def take_turn(session: Session, job: ResetJob, now: datetime) -> None:
    """Record that ``job``'s organization (and, within it, ``job``) was just served."""
    values = {"organization_id": job.organization_id, "turn_at": now, "job_created_at": job.created_at,
              "job_id": job.id}
    dialect = postgresql if _is_postgres(session) else sqlite
    stmt = dialect.insert(turns).values(**values)
    session.execute(stmt.on_conflict_do_update(
        index_elements=[turns.c.organization_id],
        set_={"turn_at": stmt.excluded.turn_at, "job_created_at": stmt.excluded.job_created_at,
              "job_id": stmt.excluded.job_id},
    ))


def next_queued_job(session: Session) -> uuid.UUID | None:
    """The queued job whose turn it is, locked (``SKIP LOCKED``: concurrent starters take different ones)."""
    j = jobs.alias("j")
    stmt = (select(j.c.id).select_from(j.outerjoin(turns, turns.c.organization_id == j.c.organization_id))
            .where(j.c.state == "queued").order_by(*_turn_order(j, turns)).limit(1)
            .with_for_update(of=j, skip_locked=True))
    return session.scalar(stmt)


@dataclass
class UnitClaim:
    """A unit of work claimed by :func:`claim_next_unit`, to run in its own transaction."""

    job_id: str
    batch_no: int
    kind: str  # learners | purge
    claim: ClaimResult


def claim_next_unit(session: Session, max_attempts: int, lease_seconds: int, now: datetime | None = None,
                    owner: str | None = None) -> UnitClaim | None:
    """Claim the runnable unit of a running course-wide job whose turn it is; None when there is none.

    Runnable: a ``pending`` batch, or a ``running`` one whose lease ran out (its worker is gone,
    or it waits out a retry backoff). The batch row is locked with ``SKIP LOCKED``, its lease
    taken (a learner batch also counts an attempt, :func:`claim_batch`), and the turn recorded,
    all in the caller's transaction: commit it before running the unit.

    ``owner`` (the claiming message's id) is written on the batch. The same message delivered
    again, because the worker running it died, first takes back the batch it still holds, lease
    or not, so a killed worker never makes its unit wait for the lease to run out.
    """
    now = now or utcnow()
    b = batches.alias("b")
    j = jobs.alias("j")
    row = None
    if owner is not None:
        row = session.execute(
            select(b.c.job_id, b.c.batch_no, b.c.kind).select_from(b.join(j, j.c.id == b.c.job_id))
            .where(b.c.state == "running", b.c.claimed_by == owner, j.c.state == "running").limit(1)
            .with_for_update(of=b, skip_locked=True)
        ).first()
    if row is None:
        runnable = or_(b.c.state == "pending", and_(b.c.state == "running", b.c.lease_expires_at < now))
        row = session.execute(
            select(b.c.job_id, b.c.batch_no, b.c.kind)
            .select_from(b.join(j, j.c.id == b.c.job_id)
                         .outerjoin(turns, turns.c.organization_id == j.c.organization_id))
            .where(runnable, j.c.state == "running", j.c.scope == "course")
            .order_by(*_turn_order(j, turns), b.c.batch_no).limit(1)
            .with_for_update(of=b, skip_locked=True)
        ).first()
    if row is None:
        return None
    key, batch_no, kind = row
    job = session.get(ResetJob, key)
    take_turn(session, job, now)
    mine = (batches.c.job_id == key) & (batches.c.batch_no == batch_no)
    if kind == "purge":
        session.execute(update(batches).where(mine).values(
            state="running", claimed_by=owner, lease_expires_at=now + timedelta(seconds=lease_seconds)))
        return UnitClaim(str(key), int(batch_no), kind, ClaimResult(True))
    return UnitClaim(str(key), int(batch_no), kind,
                     claim_batch(session, key, batch_no, max_attempts, lease_seconds, now, owner=owner))


def defer_unit(session: Session, job_id: str | uuid.UUID, batch_no: int, seconds: float,
               now: datetime | None = None) -> None:
    """A unit failed: no one picks it again for ``seconds`` (its lease becomes the backoff)."""
    now = now or utcnow()
    session.execute(
        update(batches).where(batches.c.job_id == job_uuid(job_id), batches.c.batch_no == batch_no,
                              batches.c.state.in_(("pending", "running")))
        .values(state="running", lease_expires_at=now + timedelta(seconds=seconds))
    )


def runnable_units(session: Session, job_id: str | uuid.UUID | None = None, now: datetime | None = None,
                   owner: str | None = None) -> int:
    """How many units of running course-wide jobs could be claimed now (all jobs, or one).

    A plain read: rows locked by another transaction count too. With ``owner``, the running
    units that message claimed count as well (its redelivery would take them back).
    """
    now = now or utcnow()
    runnable = or_(batches.c.state == "pending", and_(batches.c.state == "running", batches.c.lease_expires_at < now))
    if owner is not None:
        runnable = or_(runnable, and_(batches.c.state == "running", batches.c.claimed_by == owner))
    stmt = (select(func.count()).select_from(batches.join(jobs, jobs.c.id == batches.c.job_id))
            .where(runnable, jobs.c.state == "running", jobs.c.scope == "course"))
    if job_id is not None:
        stmt = stmt.where(batches.c.job_id == job_uuid(job_id))
    return int(session.scalar(stmt) or 0)


# --- batches -----------------------------------------------------------------------------

@dataclass
class ClaimResult:
    runnable: bool
    attempts: int = 0
    dead: bool = False
    job_complete: bool = False
    purge: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class PhaseProgress:
    job_complete: bool = False
    # Purge batches released by this commit: (batch_no, cursor) to publish.
    purge: list[tuple[int, int]] = field(default_factory=list)
    job_state: str = "running"


def release_purge(session: Session, job_key: uuid.UUID, now: datetime) -> list[tuple[int, int]]:
    """The learner phase is over: make the job's purge batches runnable; returns what to publish."""
    rows = session.execute(
        update(batches).where(batches.c.job_id == job_key, batches.c.kind == "purge", batches.c.state == "waiting")
        .values(state="pending", published_at=now)
        .returning(batches.c.batch_no, batches.c.cursor_row_id)
    ).all()
    return [(int(no), int(cursor)) for no, cursor in rows]


def _count_learner_batch(session: Session, key: uuid.UUID, now: datetime, learners: int,
                         dead: bool = False) -> PhaseProgress:
    """Count a finished learner batch on the job (serialised on the job row); release the purge at the end."""
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
    if purge_total and state == "running":
        return PhaseProgress(purge=release_purge(session, key, now), job_state=state)
    return PhaseProgress(job_complete=True, job_state=state)


def _count_purge_finished(session: Session, key: uuid.UUID, now: datetime, dead: bool = False) -> bool:
    values = {"heartbeat_at": now, "purge_done": jobs.c.purge_done + 1}
    if dead:
        values["batches_dead"] = jobs.c.batches_dead + 1
    done, total = session.execute(
        update(jobs).where(jobs.c.id == key).values(**values).returning(jobs.c.purge_done, jobs.c.purge_total)
    ).one()
    return done >= total


def claim_batch(
    session: Session, job_id: str | uuid.UUID, batch_no: int, max_attempts: int, lease_seconds: int,
    now: datetime | None = None, owner: str | None = None,
) -> ClaimResult:
    """Count an attempt at the batch and take its lease; commit this before doing the work.

    A finished batch is not runnable. A batch that has used up its attempts is
    dead-lettered (state ``dead`` with its last error) and counted on the job.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    row = session.execute(
        update(batches)
        .where(batches.c.job_id == key, batches.c.batch_no == batch_no, batches.c.state.in_(("pending", "running")))
        .values(attempts=batches.c.attempts + 1, state="running", claimed_at=now, claimed_by=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(batches.c.attempts, batches.c.error)
    ).first()
    if row is None:
        return ClaimResult(False)
    attempts, last_error = row
    if attempts <= max_attempts:
        return ClaimResult(True, attempts)
    reason = f"dead-lettered after {attempts - 1} attempts: {last_error or 'unknown error'}"
    session.execute(
        update(batches).where(batches.c.job_id == key, batches.c.batch_no == batch_no)
        .values(state="dead", error=reason, finished_at=now, lease_expires_at=None)
    )
    kind = session.scalar(select(batches.c.kind).where(batches.c.job_id == key, batches.c.batch_no == batch_no))
    log_event("reset.batch.dead", logging.ERROR, job_id=str(key), batch=batch_no, attempts=attempts - 1, kind=kind)
    if kind == "purge":
        return ClaimResult(False, attempts, dead=True, job_complete=_count_purge_finished(session, key, now, dead=True))
    phase = _count_learner_batch(session, key, now, learners=0, dead=True)
    return ClaimResult(False, attempts, dead=True, job_complete=phase.job_complete, purge=phase.purge)


def record_batch_error(session: Session, job_id: str | uuid.UUID, batch_no: int, error: str) -> None:
    """Remember why an attempt failed (shown when the batch is dead-lettered)."""
    session.execute(
        update(batches).where(batches.c.job_id == job_uuid(job_id), batches.c.batch_no == batch_no)
        .values(error=error[:2000])
    )


@dataclass
class BatchResult:
    status: str  # done | skipped | cancelled
    learners: int = 0
    notifications: int = 0
    cleared: dict[str, int] = field(default_factory=dict)
    job_complete: bool = False
    purge: list[tuple[int, int]] = field(default_factory=list)
    job_state: str = "running"


def _lock_batch(session: Session, key: uuid.UUID, batch_no: int) -> ResetBatch | None:
    """The batch row, locked: a concurrent duplicate of the same message waits here."""
    return session.execute(
        select(ResetBatch).where(ResetBatch.job_id == key, ResetBatch.batch_no == batch_no)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()


def _running_job_or_cancel(session: Session, batch: ResetBatch, now: datetime) -> ResetJob | None:
    """The batch's job if it is still running; otherwise mark the batch cancelled and return None."""
    job = session.get(ResetJob, batch.job_id, populate_existing=True)
    if job.state == "running":
        return job
    batch.state = "cancelled"
    batch.finished_at = now
    session.flush()
    return None


def _notification_source(job: ResetJob, now: datetime, learner_filter):
    """Outbox rows for the reset learners whose setting allows it, read now (R9)."""
    u = User.__table__.c
    return select(
        u.id, bindparam("course_id", job.course_id, type_=Integer), bindparam("job", job.id, type_=jobs.c.id.type),
        bindparam("kind", "course_assigned"), bindparam("status", "pending"), bindparam("attempts", 0, Integer),
        bindparam("created_at", now, type_=Notification.__table__.c.created_at.type),
    ).where(learner_filter, u.notify_course_assigned)


NOTIFICATION_COLUMNS = ["user_id", "course_id", "reset_job_id", "kind", "status", "attempts", "created_at"]


def _batch_targets(job: ResetJob, batch: ResetBatch):
    """The batch's learners still to reset: targeted (R6, audience), in range, not yet reset by this job."""
    a = assignments.c
    return select(a.user_id, a.status).where(
        target_filter(job.course_id, job.learner_id, as_utc(job.completed_before)),
        _key_range(a.course_id, a.user_id, job.course_id, batch.lo_user_id, batch.hi_user_id),
        or_(a.last_reset_job_id.is_(None), a.last_reset_job_id != job.id),
    )


def _restart_values(job: ResetJob) -> dict:
    """A new attempt: nothing done, not started, and the job that reset it (R4, idempotency)."""
    a = assignments.c
    return dict(status="not_started", progress_pct=0.0, items_done=0, score=None, started_at=None,
                completed_at=None, attempt=a.attempt + 1, last_reset_job_id=job.id)


def _components_to_clear(session: Session, job: ResetJob) -> list[tuple]:
    """(component, extra condition) for each component the batch must clear rows of.

    With watermarks (deferred purge) only rows newer than the job's start are
    cleared by the batch, and usually there are none: the course's highest row
    id (one backward probe of the (course_id, id) index) says so.
    """
    watermarks = job.watermarks or {}
    todo = []
    for component in RESET_COMPONENTS:
        t = component.table
        if component.name not in watermarks:
            todo.append((component, None))
            continue
        latest = session.scalar(select(func.max(t.c.id)).where(t.c.course_id == job.course_id))
        if latest is not None and latest > watermarks[component.name]:
            todo.append((component, t.c.id > watermarks[component.name]))
    return todo


@dataclass
class _Cleared:
    learners: int
    in_progress: int
    completed: int
    cleared: dict[str, int]
    notified: int


def _reset_in_one_statement(session: Session, job: ResetJob, batch: ResetBatch, now: datetime) -> _Cleared:
    """PostgreSQL: lock the batch's learners, then clear, restart and write the outbox in one statement.

    The lock comes first, in its own statement: the second statement's
    snapshot then sees all activity committed before the locks were granted,
    and it touches exactly the learners locked (R10). Every part of the second
    statement joins ``targets`` on the primary key.
    """
    a = assignments.c
    ids = session.scalar(select(func.array_agg(literal_column("locked.user_id"))).select_from(
        _batch_targets(job, batch).order_by(a.user_id).with_for_update().subquery("locked")))
    if not ids:
        return _Cleared(0, 0, 0, {c.name: 0 for c in RESET_COMPONENTS}, 0)
    # The id range keeps every part on the primary key (course_id, user_id) within the batch.
    in_range = _key_range(a.course_id, a.user_id, job.course_id, min(ids) - 1, max(ids))
    targets = select(a.user_id, a.status).where(in_range, _in_ids(session, a.user_id, ids)).cte("targets")
    target_ids = select(targets.c.user_id)
    watermarks = job.watermarks or {}
    deletes = {}
    for component in RESET_COMPONENTS:
        t = component.table
        where = [t.c.course_id == job.course_id, t.c.user_id.in_(target_ids)]
        if component.name in watermarks:
            # Only rows newer than the job's start (usually none: an index range on (course_id, id)).
            where.append(t.c.id > watermarks[component.name])
        deletes[component.name] = t.delete().where(*where).returning(t.c.id).cte(f"clear_{component.name}")
    restarted = (update(assignments).where(in_range, a.user_id == targets.c.user_id)
                 .values(**_restart_values(job)).returning(a.user_id).cte("restarted"))
    notified = (postgresql.insert(Notification.__table__)
                .from_select(NOTIFICATION_COLUMNS, _notification_source(job, now, User.__table__.c.id.in_(target_ids)))
                .on_conflict_do_nothing().returning(Notification.__table__.c.id).cte("notified"))

    def count(cte, *where):
        return select(func.count()).select_from(cte).where(*where).scalar_subquery()

    row = session.execute(select(
        count(restarted), count(targets, targets.c.status == "in_progress"),
        count(targets, targets.c.status == "completed"), count(notified), *(count(c) for c in deletes.values()),
    )).one()
    cleared = dict(zip(deletes, (int(v) for v in row[4:])))
    return _Cleared(int(row[0]), int(row[1]), int(row[2]), cleared, int(row[3]))


def _reset_statement_by_statement(session: Session, job: ResetJob, batch: ResetBatch, now: datetime) -> _Cleared:
    """SQLite (the embedded default): the same rules, one statement per part over the batch's ids.

    (SQLite has no row locks: ``BEGIN IMMEDIATE`` already serialises writers.)
    """
    targets = session.execute(_batch_targets(job, batch).order_by(assignments.c.user_id)).all()
    ids = [row.user_id for row in targets]
    cleared = {c.name: 0 for c in RESET_COMPONENTS}
    if not ids:
        return _Cleared(0, 0, 0, cleared, 0)
    for component, extra in _components_to_clear(session, job):
        t = component.table
        where = [t.c.course_id == job.course_id, _in_ids(session, t.c.user_id, ids)]
        if extra is not None:
            where.append(extra)
        cleared[component.name] = session.execute(t.delete().where(*where)).rowcount or 0
    a = assignments.c
    session.execute(update(assignments).where(a.course_id == job.course_id, _in_ids(session, a.user_id, ids))
                    .values(**_restart_values(job)))
    stmt = (sqlite.insert(Notification.__table__)
            .from_select(NOTIFICATION_COLUMNS, _notification_source(job, now, _in_ids(session, User.__table__.c.id, ids)))
            .on_conflict_do_nothing().returning(Notification.__table__.c.id))
    notified = len(session.execute(stmt).all())
    statuses = [row.status for row in targets]
    return _Cleared(len(ids), statuses.count("in_progress"), statuses.count("completed"), cleared, notified)


def run_batch(session: Session, job_id: str | uuid.UUID, batch_no: int, now: datetime | None = None) -> BatchResult:
    """Reset the learners of one batch in the caller's transaction.

    Locks the batch row (a concurrent duplicate waits, then finds it done),
    locks the targeted assignments (serialising with learner activity, R10),
    clears every registered component (R4), restarts their attempt, writes
    notification rows (R9), applies analytics deltas, marks the batch done and
    counts it on the job. Safe to run twice.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    batch = _lock_batch(session, key, batch_no)
    if batch is None or batch.state != "running" or batch.kind != "learners":
        return BatchResult("skipped")
    job = _running_job_or_cancel(session, batch, now)
    if job is None:
        # Cancelled meanwhile: hand on to the clean-up instead of waiting for the sweep.
        return BatchResult("cancelled", job_state=CANCELLING)
    reset = (_reset_in_one_statement if _is_postgres(session) else _reset_statement_by_statement)(
        session, job, batch, now)
    if reset.learners:
        analytics.apply_delta(session, job.course_id, not_started=reset.learners, in_progress=-reset.in_progress,
                              completed=-reset.completed)
    batch.state = "done"
    batch.learners_reset = reset.learners
    batch.cleared = reset.cleared
    batch.finished_at = now
    batch.lease_expires_at = None
    session.flush()
    phase = _count_learner_batch(session, key, now, learners=reset.learners)
    return BatchResult("done", reset.learners, reset.notified, reset.cleared, job_complete=phase.job_complete,
                       purge=phase.purge, job_state=phase.job_state)


# --- purge ---------------------------------------------------------------------------------

@dataclass
class PurgeResult:
    status: str  # progressed | done | skipped | cancelled | unpublished
    deleted: int = 0
    cursor: int | None = None
    job_complete: bool = False


def _component(name: str):
    for component in RESET_COMPONENTS:
        if component.name == name:
            return component
    raise KeyError(f"unknown reset component {name!r}")


def purge_step(
    session: Session, job_id: str | uuid.UUID, batch_no: int, cursor: int | None, chunk_rows: int,
    lease_seconds: int, now: datetime | None = None,
) -> PurgeResult:
    """Clear the next ``chunk_rows`` pre-job rows of one component, in id order, in the caller's transaction.

    The batch row keeps the cursor, so a message carrying a stale cursor (a
    duplicate, or one already processed) is recognised and refused; the caller
    publishes the next step with the new cursor after commit.
    """
    now = now or utcnow()
    key = job_uuid(job_id)
    row = _lock_batch(session, key, batch_no)
    if row is None or row.kind != "purge" or row.state not in ("pending", "running"):
        return PurgeResult("skipped")
    if cursor is not None and row.cursor_row_id != cursor:
        if row.claimed_at is not None and (row.published_at is None or row.published_at < row.claimed_at):
            # The step that moved the cursor committed but its publish was never recorded
            # (the worker died in between): this older message restarts the chain.
            return PurgeResult("unpublished", cursor=row.cursor_row_id)
        return PurgeResult("skipped")
    job = _running_job_or_cancel(session, row, now)
    if job is None:
        return PurgeResult("cancelled")
    t = _component(row.component).table
    chunk = (select(t.c.id).where(_key_range(t.c.course_id, t.c.id, job.course_id, row.cursor_row_id,
                                             row.hi_row_id))
             .order_by(t.c.id).limit(chunk_rows).subquery())
    boundary = session.scalar(select(func.max(chunk.c.id)))
    deleted = 0
    if boundary is not None:
        where = [_key_range(t.c.course_id, t.c.id, job.course_id, row.cursor_row_id, boundary)]
        # Learners of a dead-lettered batch were not reset: their rows stay.
        for lo, hi in session.execute(select(batches.c.lo_user_id, batches.c.hi_user_id).where(
                batches.c.job_id == key, batches.c.kind == "learners", batches.c.state == "dead")):
            where.append(~and_(t.c.user_id > lo, t.c.user_id <= hi))
        if row.attempts:
            # This chunk failed before: delete it in halving sets inside savepoints, so one
            # row that cannot be deleted holds back only itself, and name it.
            deleted, stuck = _delete_around_failures(session, t, where)
            if stuck:
                ids = ", ".join(str(i) for i, _ in stuck[:20]) + (" ..." if len(stuck) > 20 else "")
                row.error = (f"{STUCK_PREFIX} {len(stuck)} {row.component} row(s) (ids {ids}): {stuck[0][1]}"
                             if not (row.error or "").startswith(STUCK_PREFIX) else row.error)
        else:
            deleted = session.execute(t.delete().where(*where)).rowcount or 0
        row.cursor_row_id = int(boundary)
        row.cleared = {row.component: int((row.cleared or {}).get(row.component, 0)) + deleted}
    row.attempts = 0
    if not (row.error or "").startswith(STUCK_PREFIX):
        row.error = None
    if boundary is None or boundary >= row.hi_row_id:
        stuck_rows = (row.error or "").startswith(STUCK_PREFIX)
        row.state = "dead" if stuck_rows else "done"
        row.finished_at = now
        row.lease_expires_at = None
        session.flush()
        return PurgeResult("done", deleted, row.cursor_row_id,
                           job_complete=_count_purge_finished(session, key, now, dead=stuck_rows))
    # Between chunks the batch is pending again: the next chunk is whichever unit is next in turn.
    row.state = "pending"
    row.claimed_at = now
    row.lease_expires_at = None
    session.flush()
    session.execute(update(jobs).where(jobs.c.id == key).values(heartbeat_at=now))
    return PurgeResult("progressed", deleted, row.cursor_row_id)


STUCK_PREFIX = "could not delete"


def _delete_around_failures(session: Session, t, where: list) -> tuple[int, list[tuple[int, str]]]:
    """Delete the matching rows in halving sets, each in a savepoint; return (deleted, [(id, error)])."""
    ids = list(session.scalars(select(t.c.id).where(*where).order_by(t.c.id)))
    deleted = 0
    stuck: list[tuple[int, str]] = []
    pending = [ids] if ids else []
    while pending:
        part = pending.pop()
        try:
            with session.begin_nested():
                deleted += session.execute(
                    t.delete().where(_in_ids(session, t.c.id, part, BigInteger))).rowcount or 0
        except (OperationalError, InterfaceError):
            raise  # connection or transaction lost: retry the step, do not blame rows
        except Exception as exc:  # the database refused this set: narrow it down
            if len(part) == 1:
                stuck.append((part[0], f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
            else:
                middle = len(part) // 2
                pending.extend([part[middle:], part[:middle]])
    return deleted, sorted(stuck)


def mark_purge_published(session: Session, job_id: str | uuid.UUID, batch_no: int, cursor: int) -> None:
    """Record that the step at ``cursor`` was published (after the publish succeeded)."""
    session.execute(
        update(batches).where(batches.c.job_id == job_uuid(job_id), batches.c.batch_no == batch_no,
                              batches.c.cursor_row_id == cursor)
        .values(published_at=utcnow())
    )


def fail_purge_step(
    session: Session, job_id: str | uuid.UUID, batch_no: int, error: str, max_attempts: int,
    now: datetime | None = None,
) -> tuple[bool, bool]:
    """Count a failed purge step; dead-letter after ``max_attempts`` in a row. Returns (dead, job_complete)."""
    now = now or utcnow()
    key = job_uuid(job_id)
    attempts = session.scalar(
        update(batches)
        .where(batches.c.job_id == key, batches.c.batch_no == batch_no, batches.c.state.in_(("pending", "running")))
        .values(attempts=batches.c.attempts + 1, error=error[:2000])
        .returning(batches.c.attempts)
    )
    if attempts is None or attempts < max_attempts:
        return False, False
    session.execute(
        update(batches).where(batches.c.job_id == key, batches.c.batch_no == batch_no)
        .values(state="dead", error=f"dead-lettered after {attempts} attempts: {error[:1900]}", finished_at=now)
    )
    log_event("reset.batch.dead", logging.ERROR, job_id=str(key), batch=batch_no, attempts=attempts, kind="purge")
    return True, _count_purge_finished(session, key, now, dead=True)


def purge_reset_learners(session: Session, job: ResetJob) -> dict[str, int]:
    """Clear the pre-job rows of the learners this job did reset (a cancelled job's clean-up).

    Restricted by a join on ``last_reset_job_id``: learners the job never
    reached keep everything. Safe to run twice.
    """
    a = assignments.c
    reset_by_job = select(a.user_id).where(a.course_id == job.course_id, a.last_reset_job_id == job.id)
    cleared: dict[str, int] = {}
    for component in RESET_COMPONENTS:
        if component.name not in (job.watermarks or {}):
            continue
        t = component.table
        cleared[component.name] = session.execute(t.delete().where(
            t.c.course_id == job.course_id, t.c.id <= job.watermarks[component.name],
            t.c.user_id.in_(reset_by_job),
        )).rowcount or 0
    return cleared


# --- finalize ----------------------------------------------------------------------------

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
    if session.scalar(select(jobs.c.state).where(jobs.c.id == key)) == CANCELLING:
        # One lock order everywhere: batch rows before the job row, as a batch or purge step
        # takes them. Waiting here also lets a batch in flight commit (and count) first.
        session.execute(select(batches.c.batch_no).where(batches.c.job_id == key)
                        .order_by(batches.c.batch_no).with_for_update())
    job = session.execute(
        select(ResetJob).where(ResetJob.id == key).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if job is None:
        return FinalizeResult(False, "missing")
    if job.state == CANCELLING:
        return _finalize_cancelled(session, job, now)
    if job.state != "running":
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
    job.cleared = cleared
    job.learners_done = learners_done
    if job.learners_total != learners_done:
        # Learners started, were removed or were reset by another path while the job ran.
        log_event("reset.targets.changed", job_id=str(key), planned=job.learners_total, reset=learners_done)
        job.learners_total = learners_done
    job.finished_at = now
    job.heartbeat_at = now
    if dead:
        first_no, first_error = dead[0]
        job.state = "failed"
        job.error = (f"batch {first_no} {first_error}" if len(dead) == 1
                     else f"{len(dead)} batches dead-lettered; first: batch {first_no} {first_error}")
    else:
        job.state = "succeeded"
    job.finalized_at = now
    record_audit(
        session, f"reset.{job.state}", job.organization_id, actor_id=job.actor_id, course_id=job.course_id,
        learner_id=job.learner_id, job_id=job.id, campaign_id=job.campaign_id, learner_count=learners_done,
        reason=job.reason, origin=job.origin,
    )
    session.flush()
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
        if row.state == "dead":
            dead.append((row.batch_no, row.error))
    return cleared, learners_done, dead


def _finalize_cancelled(session: Session, job: ResetJob, now: datetime) -> FinalizeResult:
    """Once no batch is in flight: clear what the purge did not reach for reset learners, exact
    analytics, state ``cancelled``, and the audit event with the true number of learners reset.

    A learner batch still ``running`` under a live lease is in flight (its own transaction holds
    its row, or it is about to start and will find the job cancelling): wait for it. One whose
    lease ran out lost its worker; its work rolled back with it, so it is cancelled here.
    """
    in_flight = session.scalar(select(func.count()).select_from(batches).where(
        batches.c.job_id == job.id, batches.c.state == "running", batches.c.kind == "learners",
        or_(batches.c.lease_expires_at.is_(None), batches.c.lease_expires_at >= now)))
    if in_flight:
        return FinalizeResult(False, job.state)
    session.execute(update(batches).where(batches.c.job_id == job.id, batches.c.state.in_(
        ("waiting", "pending", "running"))).values(state="cancelled", finished_at=now, lease_expires_at=None))
    extra = purge_reset_learners(session, job)
    analytics.recompute_course_analytics(session, job.course_id)
    cleared, learners_done, _dead = _totals(session, job.id)
    for name, count in extra.items():
        cleared[name] = cleared.get(name, 0) + count
    job.cleared = cleared
    job.learners_done = learners_done
    job.state = "cancelled"
    job.finished_at = now
    job.heartbeat_at = now
    job.finalized_at = now
    record_audit(
        session, "reset.cancelled", job.organization_id, actor_id=job.cancelled_by or job.actor_id,
        course_id=job.course_id, learner_id=job.learner_id, job_id=job.id, campaign_id=job.campaign_id,
        learner_count=learners_done, reason=job.reason, origin=job.origin,
    )
    session.flush()
    log_event("reset.job.cancelled", job_id=str(job.id), learners=learners_done, cleared=cleared)
    return FinalizeResult(True, job.state)


def retry_countdown(attempts: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter, capped well below the broker's visibility timeout."""
    return random.uniform(0, min(cap, base * (2 ** max(0, attempts - 1))))
