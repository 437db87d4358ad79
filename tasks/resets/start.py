"""Starting a job: claim the queued job whose turn it is (``queued`` -> ``running``) and write every
batch row before any runs, because a batch can finish before the others are written.

Learner batches are keyset ranges of learner ids, balanced in size. A course-wide job over
everyone assigned also gets, per component worth it, waiting purge batches over the rows that
predate the job (see :mod:`tasks.resets.purge` for why); its learner batches then clear
only rows newer than the job's watermarks. :func:`start_next_job` runs it all in one
transaction and wakes workers for the units after commit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from models.components import RESET_COMPONENTS
from models.db import session_scope
from models.dialect import is_postgres
from models.job_ids import job_uuid
from models.jobs import target_filter
from models.lag_metrics import JOB_START_WAIT, observe
from models.logs import log_event
from models.schema import ResetJob
from models.settings import get_settings
from models.states import BatchKind, BatchState, JobScope, JobState
from models.times import as_utc, utcnow
from models.tracing import JobSpan, current_traceparent, job_traceparent, job_work
from tasks.resets.one_learner import run_one_learner_job
from tasks.resets.tables import assignments, batches, jobs
from tasks.resets.turns import next_queued_job, take_turn
from tasks.resets.wakeups import wake_workers

MAX_USER_ID = 2**31 - 1
# The span of a job's start in its trace.
START_SPAN = "resets.start"


@dataclass
class StartResult:
    started: bool
    scope: str | None = None
    batch_nos: list[int] = field(default_factory=list)
    purge_total: int = 0
    job_id: str | None = None
    organization_id: int | None = None
    waited_seconds: float = 0.0  # confirmed to started


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
        row.update(state=BatchState.PENDING, attempts=0, published_at=now, learners_reset=0, cleared={})
    session.execute(insert(batches), rows)
    session.execute(
        update(jobs).where(jobs.c.id == job.id).values(batches_total=len(rows), learners_total=learners_total)
    )
    return [row["batch_no"] for row in rows]


def uses_deferred_purge(job: ResetJob) -> bool:
    """Course-wide jobs over everyone assigned purge in id order; the others clear per batch."""
    return job.scope == JobScope.COURSE and job.completed_before is None


def plan_purge(session: Session, job: ResetJob, first_batch_no: int, partitions: int = 1,
               chunk_rows: int = 50000, min_rows: int = 0) -> int:
    """Record the watermarks and write the waiting purge batches of the components worth purging.

    A component whose earlier rows in the course number fewer than ``min_rows``
    (counted with a bounded probe of the ``(course_id, id)`` index) gets no
    watermark: the learner batches clear its rows directly, which costs less
    than a purge when the rows are few. The others get up to ``partitions``
    disjoint id ranges, one per ``chunk_rows`` rows, that run in parallel
    (decision records 0002 and 0005).
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
            rows.append({"job_id": job.id, "batch_no": first_batch_no + len(rows), "kind": BatchKind.PURGE,
                         "component": component.name, "cursor_row_id": lo, "hi_row_id": hi,
                         "lo_user_id": 0, "hi_user_id": MAX_USER_ID, "state": BatchState.WAITING, "attempts": 0,
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
    values = dict(state=JobState.RUNNING, started_at=now, heartbeat_at=now)
    traceparent = current_traceparent()
    if traceparent is not None:  # a job confirmed untraced (the CLI, tracing off then) is traced from here
        values["traceparent"] = func.coalesce(jobs.c.traceparent, traceparent)
    claimed = session.execute(
        update(jobs).where(jobs.c.id == key, jobs.c.state == JobState.QUEUED).values(**values)
    ).rowcount
    if claimed != 1:
        return StartResult(False)
    job = session.get(ResetJob, key, populate_existing=True)
    batch_nos = plan_batches(session, job, batch_size if job.scope == JobScope.COURSE else 1)
    purge_total = 0
    if uses_deferred_purge(job):
        purge_total = plan_purge(session, job, first_batch_no=len(batch_nos) + 1, partitions=purge_partitions,
                                 chunk_rows=purge_chunk_rows, min_rows=purge_min_rows)
    take_turn(session, job, now)
    log_event("reset.job.started", job_id=str(key), course_id=job.course_id, scope=job.scope,
              batches=len(batch_nos), purge_batches=purge_total)
    waited = max(0.0, (now - as_utc(job.confirmed_at or now)).total_seconds())
    return StartResult(True, job.scope, batch_nos, purge_total, str(key), job.organization_id, waited)


def start_next_job(job_id: str) -> StartResult:
    """Start the queued job whose turn it is (usually ``job_id``: each confirm publishes one start,
    so each job gets one), in one transaction; then wake workers for a course-wide job's units,
    or run a one-learner job's batch right here. The start runs in a span of the started job's
    trace, linked to the message that carried it (models/tracing.py)."""
    with job_work(START_SPAN) as work:
        return _start_next_job(job_id, work)


def _start_next_job(job_id: str, work: JobSpan) -> StartResult:
    settings = get_settings()
    with session_scope() as session:
        key = next_queued_job(session)
        if key is None:
            log_event("reset.start.skipped", job_id=job_id)
            return StartResult(False)
        work.join(job_traceparent(session, key), job_id=str(key))
        # SQLite serialises writers, so parallel purge batches would only queue behind each other.
        partitions = settings.purge_partitions if is_postgres(session) else 1
        result = start_job(session, key, settings.batch_size, purge_partitions=partitions,
                           purge_chunk_rows=settings.purge_chunk_rows, purge_min_rows=settings.purge_min_rows)
        if result.started and result.scope == JobScope.COURSE:
            wake_workers(session, len(result.batch_nos) or 1)
    if not result.started:
        log_event("reset.start.skipped", job_id=job_id)
        return result
    observe(JOB_START_WAIT, [(result.organization_id, result.waited_seconds)])
    if result.scope == JobScope.LEARNER:
        run_one_learner_job(result.job_id, result.batch_nos)
    return result
