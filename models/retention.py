"""Retention: what no one needs after a while is removed, in bounded chunks (decision record 0012).

Each kind of finished row goes after its own number of days (``RETENTION_*_DAYS``):

- ``notifications`` ``sent`` or ``failed``, counted from when the row was written (a row is sent or
  given up within hours of that); the counts by status stay with the job
  (``pruned_notifications``), so its status still reads them;
- ``webhook_deliveries`` ``delivered``, ``failed`` or ``cancelled``, counted from when the event
  was written; a ``webhook_events`` row goes with its last delivery;
- ``reset_batches`` ``done`` or ``cancelled``, counted from when the batch finished; a dead-lettered
  batch stays with its job (``dead-batches`` reads it, the job's status counts it);
- ``reset_jobs`` finished (succeeded, failed, cancelled, or expired unconfirmed), counted from
  creation, once it finished before its rows' windows began and none of its notifications is
  still to be sent: the job leaves with its dead-lettered batches, and ``status`` answers "not
  found" from then on. A job window shorter than its rows' windows waits for them.

Never removed: anything of a job that is not finished (awaiting confirmation, queued, running,
cancelling), an outbox row still to be sent, and the audit trail (append-only, R5), which keeps
the fact of every reset after its job is gone.

The work is done in chunks of at most ``RETENTION_CHUNK_ROWS`` rows, oldest first, each in the
caller's transaction (:func:`remove_chunk`), so every chunk is a short transaction of its own;
rows are picked with ``SKIP LOCKED``, so two sweeps at once remove disjoint rows, and a sweep
killed half-way left only whole chunks behind. Functions take a ``Session`` and never commit.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Uuid, and_, delete, exists, func, or_, select, tuple_
from sqlalchemy.orm import Session

from models.dialect import in_ids, insert
from models.schema import (Notification, PrunedNotifications, ResetBatch, ResetJob, RetentionTotal, WebhookDelivery,
                           WebhookEvent)
from models.settings import Settings
from models.states import FINISHED_JOB_STATES, BatchState, DeliveryStatus, JobState, NotificationStatus

n = Notification.__table__
d = WebhookDelivery.__table__
ev = WebhookEvent.__table__
b = ResetBatch.__table__
j = ResetJob.__table__
pruned = PrunedNotifications.__table__
totals = RetentionTotal.__table__

UNFINISHED_JOB_STATES = tuple(state for state in JobState if state not in FINISHED_JOB_STATES)
FINISHED_NOTIFICATIONS = (NotificationStatus.SENT, NotificationStatus.FAILED)
OPEN_NOTIFICATIONS = (NotificationStatus.PENDING, NotificationStatus.SENDING)
FINISHED_DELIVERIES = (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.CANCELLED)
REMOVED_BATCH_STATES = (BatchState.DONE, BatchState.CANCELLED)

# The sweep's steps, in order: a job goes last, once the rows of shorter windows are gone.
STEPS = ("notifications", "webhook_deliveries", "reset_batches", "reset_jobs")
# Every table retention removes from, as the report lists them.
TABLES = ("notifications", "webhook_deliveries", "webhook_events", "reset_batches", "reset_jobs")
NEVER_REMOVED = ("audit_events",)
# The window of each table, by the setting that holds it (events share their deliveries').
WINDOWS = {"notifications": "retention_notifications_days", "webhook_deliveries": "retention_webhooks_days",
           "webhook_events": "retention_webhooks_days", "reset_batches": "retention_batches_days",
           "reset_jobs": "retention_jobs_days"}
# Rows per statement parameter list (SQLite allows 32,766 parameters, PostgreSQL 65,535).
PARAMETER_SLICE = 1000


@dataclass(frozen=True)
class Policy:
    """The days each table keeps its finished rows, and the instant the sweep counts them from."""

    now: datetime
    days: dict[str, int]

    @classmethod
    def at(cls, now: datetime, settings: Settings) -> "Policy":
        return cls(now, {table: getattr(settings, name) for table, name in WINDOWS.items()})

    def before(self, table: str) -> datetime:
        """Finished rows of ``table`` older than this may go."""
        return self.now - timedelta(days=self.days[table])


@dataclass
class Sweep:
    """A retention pass under way: where each step's walk has got to and what it removed.

    ``cursors`` hold the age of the last row a step removed, so its next chunk starts there
    instead of stepping again over the index entries of rows it removed moments ago.
    """

    policy: Policy
    chunk_rows: int
    cursors: dict[str, datetime | None] = field(default_factory=lambda: dict.fromkeys(STEPS))
    finished: set[str] = field(default_factory=set)
    removed: Counter = field(default_factory=Counter)
    chunks: int = 0

    @property
    def done(self) -> bool:
        return len(self.finished) == len(STEPS)

    def report(self) -> dict[str, int]:
        return {table: int(self.removed[table]) for table in TABLES}


def start_sweep(now: datetime, settings: Settings) -> Sweep:
    return Sweep(Policy.at(now, settings), settings.retention_chunk_rows)


# --- what may go ----------------------------------------------------------------------------------

def unfinished_jobs(session: Session) -> list[uuid.UUID]:
    """The jobs nothing may be removed of: awaiting confirmation, queued, running, cancelling.

    A handful at any time, read through ``ix_reset_jobs_state_created``; each chunk checks its rows
    against this list instead of looking up every row's job. A job that starts after the list was
    read has no row older than a window.
    """
    return list(session.scalars(select(j.c.id).where(j.c.state.in_(UNFINISHED_JOB_STATES))))


def _not_of(session: Session, column, jobs: list[uuid.UUID]):
    return ~in_ids(session, column, jobs, Uuid)


def _notification_removable(session: Session, t, before: datetime, jobs: list[uuid.UUID]):
    return and_(t.c.status.in_(FINISHED_NOTIFICATIONS), t.c.created_at < before, _not_of(session, t.c.reset_job_id, jobs))


def _delivery_removable(session: Session, t, before: datetime, jobs: list[uuid.UUID]):
    return and_(t.c.status.in_(FINISHED_DELIVERIES), t.c.created_at < before,
                or_(t.c.job_id.is_(None), _not_of(session, t.c.job_id, jobs)))


def _batch_removable(session: Session, t, before: datetime, jobs: list[uuid.UUID]):
    return and_(t.c.state.in_(REMOVED_BATCH_STATES), t.c.finished_at < before, _not_of(session, t.c.job_id, jobs))


def _job_removable(t, policy: Policy):
    """Finished and past its window, finished before its rows' windows began, none of its notifications
    still to be sent.

    A job's notification and batch rows are all written and finished before the job finishes, so
    once it finished before the notifications' and the batches' windows began, each of its rows
    is past its own window: a job waits for its rows rather than taking young ones along, and
    removing it removes nothing more than its row and its dead-lettered batches. (An unconfirmed
    request never finished and has no rows.)
    """
    rows_before = min(policy.before("notifications"), policy.before("reset_batches"))
    return and_(t.c.state.in_(FINISHED_JOB_STATES), t.c.created_at < policy.before("reset_jobs"),
                or_(t.c.finished_at.is_(None), t.c.finished_at < rows_before),
                ~exists().where(n.c.reset_job_id == t.c.id, n.c.status.in_(OPEN_NOTIFICATIONS)))


def _count(session: Session, table, where) -> int:
    return int(session.scalar(select(func.count()).select_from(table).where(where)) or 0)


def removable_counts(session: Session, policy: Policy) -> dict[str, int]:
    """Rows per table a sweep at ``policy.now`` would remove (the same predicates as the chunks); a
    job past its window counts its dead batches too."""
    jobs = unfinished_jobs(session)
    other = d.alias("other")
    deliveries_before = policy.before("webhook_deliveries")
    events = and_(
        exists().where(d.c.event_id == ev.c.id, _delivery_removable(session, d, deliveries_before, jobs)),
        ~exists().where(other.c.event_id == ev.c.id, ~_delivery_removable(session, other, deliveries_before, jobs)))
    removed_jobs = select(j.c.id).where(_job_removable(j, policy))
    return {
        "notifications": _count(session, n, _notification_removable(session, n, policy.before("notifications"), jobs)),
        "webhook_deliveries": _count(session, d, _delivery_removable(session, d, deliveries_before, jobs)),
        "webhook_events": _count(session, ev, events),
        "reset_batches": _count(session, b, or_(_batch_removable(session, b, policy.before("reset_batches"), jobs),
                                                and_(b.c.state == BatchState.DEAD, b.c.job_id.in_(removed_jobs)))),
        "reset_jobs": _count(session, j, _job_removable(j, policy)),
    }


# --- removing, one chunk at a time ------------------------------------------------------------------

def remove_chunk(session: Session, sweep: Sweep) -> bool:
    """Remove one chunk (at most ``sweep.chunk_rows`` rows of one step) in the caller's transaction.

    Returns False once every step has nothing left, True otherwise; ``sweep`` records what
    was removed. Safe to run concurrently and again: rows are picked with ``SKIP LOCKED``
    and removed only while still removable.
    """
    for step in STEPS:
        if step in sweep.finished:
            continue
        remover = _REMOVERS[step]
        removed, picked, last = remover(session, sweep.policy, sweep.cursors[step], sweep.chunk_rows)
        sweep.chunks += 1
        sweep.removed.update(removed)
        sweep.cursors[step] = last or sweep.cursors[step]
        if picked < sweep.chunk_rows:
            sweep.finished.add(step)
        if picked:
            return True
    return False


def _picked(table, key, where, after: datetime | None, limit: int):
    """The ids of the next chunk, oldest first from ``after``, locked (rows another sweep holds are skipped)."""
    ids = [c for c in table.primary_key.columns]
    query = select(*ids).where(where)
    if after is not None:
        query = query.where(key >= after)
    return query.order_by(key).limit(limit).with_for_update(of=table, skip_locked=True).cte("picked")


def _remove_notifications(session: Session, policy: Policy, after: datetime | None, limit: int):
    removable = _notification_removable(session, n, policy.before("notifications"), unfinished_jobs(session))
    picked = _picked(n, n.c.created_at, removable, after, limit)
    rows = session.execute(delete(n).where(n.c.id.in_(select(picked.c.id)))
                           .returning(n.c.reset_job_id, n.c.status, n.c.created_at)).all()
    per_job: dict[uuid.UUID, Counter] = {}
    for job_id, status, _at in rows:
        per_job.setdefault(job_id, Counter())[status] += 1
    keep_counts(session, per_job)
    statuses = Counter(status for _job, status, _at in rows)
    _add_totals(session, {"notifications_sent": statuses[NotificationStatus.SENT],
                          "notifications_failed": statuses[NotificationStatus.FAILED]})
    return {"notifications": len(rows)}, len(rows), max((at for *_, at in rows), default=None)


def _remove_deliveries(session: Session, policy: Policy, after: datetime | None, limit: int):
    """Finished deliveries, and each event whose last delivery this was (in the same transaction)."""
    removable = _delivery_removable(session, d, policy.before("webhook_deliveries"), unfinished_jobs(session))
    picked = _picked(d, d.c.created_at, removable, after, limit)
    rows = session.execute(delete(d).where(d.c.id.in_(select(picked.c.id)))
                           .returning(d.c.event_id, d.c.created_at)).all()
    event_ids = sorted({event_id for event_id, _at in rows})
    events = 0
    for start in range(0, len(event_ids), PARAMETER_SLICE):
        events += session.execute(delete(ev).where(
            in_ids(session, ev.c.id, event_ids[start:start + PARAMETER_SLICE], Uuid),
            ~exists().where(d.c.event_id == ev.c.id))).rowcount or 0
    return ({"webhook_deliveries": len(rows), "webhook_events": events}, len(rows),
            max((at for _e, at in rows), default=None))


def _remove_batches(session: Session, policy: Policy, after: datetime | None, limit: int):
    removable = _batch_removable(session, b, policy.before("reset_batches"), unfinished_jobs(session))
    picked = _picked(b, b.c.finished_at, removable, after, limit)
    rows = session.execute(delete(b).where(tuple_(b.c.job_id, b.c.batch_no).in_(
        select(picked.c.job_id, picked.c.batch_no))).returning(b.c.state, b.c.finished_at)).all()
    _add_totals(session, {"batches_done": sum(1 for state, _at in rows if state == BatchState.DONE)})
    return {"reset_batches": len(rows)}, len(rows), max((at for _s, at in rows), default=None)


def _remove_jobs(session: Session, policy: Policy, after: datetime | None, limit: int):
    """Finished jobs past their window (oldest first, through ``ix_reset_jobs_finished_created``), with
    their batches: the dead-lettered ones, or any another sweep held. A notification row of a removed
    job another sweep held is removed by its own step."""
    query = select(j.c.id, j.c.created_at).where(_job_removable(j, policy))
    if after is not None:
        query = query.where(j.c.created_at >= after)
    picked = session.execute(query.order_by(j.c.created_at).limit(limit)
                             .with_for_update(of=j, skip_locked=True)).all()
    removed: Counter = Counter()
    for start in range(0, len(picked), PARAMETER_SLICE):
        removed.update(_remove_whole_jobs(session, [job_id for job_id, _at in picked[start:start + PARAMETER_SLICE]]))
    return removed, len(picked), max((at for _id, at in picked), default=None)


def _remove_whole_jobs(session: Session, ids: list[uuid.UUID]) -> Counter:
    """The jobs' batches (dead-lettered ones, or any another sweep held), their kept counts, the jobs."""
    states = Counter(session.execute(delete(b).where(in_ids(session, b.c.job_id, ids, Uuid))
                                     .returning(b.c.state)).scalars().all())
    session.execute(delete(pruned).where(in_ids(session, pruned.c.reset_job_id, ids, Uuid)))
    learners = session.execute(delete(j).where(in_ids(session, j.c.id, ids, Uuid))
                               .returning(j.c.learners_done)).scalars().all()
    _add_totals(session, {"batches_done": states[BatchState.DONE], "batches_dead": states[BatchState.DEAD],
                          "learners_reset": sum(learners)})
    return Counter({"reset_jobs": len(learners), "reset_batches": states.total()})


_REMOVERS = {"notifications": _remove_notifications, "webhook_deliveries": _remove_deliveries,
             "reset_batches": _remove_batches, "reset_jobs": _remove_jobs}


# --- what is kept of what went -----------------------------------------------------------------------

def keep_counts(session: Session, per_job: dict[uuid.UUID, Counter]) -> None:
    """Add removed notification rows, by status, to their jobs' ``pruned_notifications`` counts."""
    rows = [{"reset_job_id": job_id, "sent": c[NotificationStatus.SENT], "failed": c[NotificationStatus.FAILED]}
            for job_id, c in sorted(per_job.items())]  # one lock order, so two sweeps never deadlock
    for start in range(0, len(rows), PARAMETER_SLICE):
        stmt = insert(session, pruned).values(rows[start:start + PARAMETER_SLICE])
        session.execute(stmt.on_conflict_do_update(
            index_elements=[pruned.c.reset_job_id],
            set_={"sent": pruned.c.sent + stmt.excluded.sent, "failed": pruned.c.failed + stmt.excluded.failed}))


def pruned_notification_counts(session: Session, job_id: uuid.UUID) -> dict[str, int]:
    """The job's notification rows retention removed: ``{"sent": n, "failed": n}``."""
    row = session.execute(select(pruned.c.sent, pruned.c.failed).where(pruned.c.reset_job_id == job_id)).first()
    return {NotificationStatus.SENT: row.sent if row else 0, NotificationStatus.FAILED: row.failed if row else 0}


def _add_totals(session: Session, counts: dict[str, int]) -> None:
    rows = [{"name": name, "rows": value} for name, value in sorted(counts.items()) if value]
    if rows:
        stmt = insert(session, totals).values(rows)
        session.execute(stmt.on_conflict_do_update(index_elements=[totals.c.name],
                                                   set_={"rows": totals.c.rows + stmt.excluded.rows}))


def retention_totals(session: Session) -> dict[str, int]:
    """Rows retention removed, ever, by kind (``notifications_sent``, ``batches_done``, ``learners_reset``, ...)."""
    return {name: int(rows) for name, rows in session.execute(select(totals.c.name, totals.c.rows)).all()}
