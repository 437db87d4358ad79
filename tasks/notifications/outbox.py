"""The outbox rows of course-assigned notifications, and every change of their state.

Each function takes a Session, never commits and never talks to Celery or to a provider, so
the sender can keep its transactions short (claim, then record outcomes) and the maintenance
sweep can run :func:`sweep_notifications` inside its own transaction::

    pending --claim--> sending --mark_sent--> sent
                          |--mark_retry--> pending (next_attempt_at = retry_delay) ... --> failed (max attempts)
                          |--mark_failed--> failed (reason)
                          |--release_notifications--> pending (never tried, attempt not counted)
                          '--worker lost--> claimable again once its lease ended; failed if that was the last attempt

A claim is a conditional UPDATE, so concurrent claimers never hold the same row. Each claim
writes a token of its own (``claimed_by``) and owns the row for its *lease*, which outlives the
send's total deadline: a row is claimed again only once its send can no longer be under way,
and every later write to a claimed row checks the claim's token and attempt, so a run whose
lease ran out cannot overwrite the row's new owner. A message delivered twice claims twice:
disjoint rows, each sent once.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session

from models.dialect import is_postgres
from models.job_ids import job_uuid
from models.lag_metrics import NOTIFICATION_LAG, observe
from models.logs import log_event
from models.messaging import on_commit, publish_after_commit
from models.schema import Notification, ResetJob
from models.settings import Settings, get_settings
from models.states import NotificationStatus
from models.times import as_utc, utcnow
from tasks.backoff import backoff_seconds
from tasks.outbound.answers import redact

TASK_NAME = "notifications.send"

# A row that failed transiently waits backoff_seconds(attempt, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS).
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# The sweep publishes one send per job with rows left behind, for up to this many jobs a tick.
SWEEP_MAX_JOBS = 50


def retry_delay(attempts: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
    """Seconds before a row that failed transiently on attempt ``attempts`` is tried again:
    :func:`backoff_seconds` with 1 s base and 300 s cap, never earlier than the provider's ``Retry-After``."""
    delay = backoff_seconds(attempts, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, rng)
    return delay if retry_after is None else max(delay, retry_after)


@dataclass(frozen=True)
class ClaimedNotification:
    """A row this run owns: ``attempts`` (already counting this attempt) identifies the claim."""

    id: int
    user_id: int
    course_id: int
    reset_job_id: uuid.UUID
    kind: str
    attempts: int
    token: str


def _job_uuid(job_id: str | uuid.UUID | None) -> uuid.UUID | None:
    return None if job_id is None else job_uuid(job_id)


def _of_job(stmt, job: uuid.UUID | None):
    return stmt if job is None else stmt.where(Notification.reset_job_id == job)


def _due(now: datetime):
    n = Notification
    return and_(n.status == NotificationStatus.PENDING, or_(n.next_attempt_at.is_(None), n.next_attempt_at <= now))


_RETURNED = (Notification.id, Notification.user_id, Notification.course_id, Notification.reset_job_id,
             Notification.kind, Notification.attempts)


def new_claim_token() -> str:
    """The token one claim writes on its rows (``claimed_by``)."""
    return uuid.uuid4().hex


def claim_notifications(
    session: Session, job_id: str | uuid.UUID | None, limit: int, lease_seconds: float, max_attempts: int,
    now: datetime | None = None, token: str | None = None,
) -> list[ClaimedNotification]:
    """Claim up to ``limit`` rows of ``job_id`` (or of any job) whose turn it is: ``sending``, one more
    attempt, ``claimed_at = now``, ``claimed_by = token`` (a new one if not given).

    First the rows whose claim's lease ran out (their worker was lost mid-send; one that had used
    its last attempt is failed instead), then due ``pending`` rows in id order. Rows another
    transaction is claiming are skipped (``SKIP LOCKED``) on PostgreSQL; on SQLite, writers are
    serialised (``BEGIN IMMEDIATE``) and the conditions make the claim conditional all the same.
    Safe to run concurrently: no row is claimed twice. The claim holds once committed.
    """
    now = now or utcnow()
    token = token or new_claim_token()
    job = _job_uuid(job_id)
    rows = _take_back_lost(session, job, limit, now, token, lease_seconds, max_attempts)
    if len(rows) < limit:
        rows += _claim_due(session, job, limit - len(rows), now, token)
    claimed = sorted((ClaimedNotification(*row, token) for row in rows), key=lambda c: c.id)
    if claimed:
        log_event("notification.claimed", job_id=str(job) if job else None, count=len(claimed))
    return claimed


def _claim(session: Session, picked, state: NotificationStatus, now: datetime, token: str) -> list:
    n = Notification
    if is_postgres(session):
        picked = picked.with_for_update(skip_locked=True)
    picked_cte = picked.cte("picked")
    return session.execute(
        update(n).where(n.id == picked_cte.c.id, n.status == state)
        .values(status=NotificationStatus.SENDING, claimed_at=now, claimed_by=token, attempts=n.attempts + 1)
        .returning(*_RETURNED)
    ).all()


def _claim_due(session: Session, job: uuid.UUID | None, limit: int, now: datetime, token: str) -> list:
    n = Notification
    return _claim(session, _of_job(select(n.id).where(_due(now)), job).order_by(n.id).limit(limit),
                  NotificationStatus.PENDING, now, token)


def _lost(now: datetime, lease_seconds: float):
    n = Notification
    return and_(n.status == NotificationStatus.SENDING, n.claimed_at < now - timedelta(seconds=lease_seconds))


def _take_back_lost(session: Session, job: uuid.UUID | None, limit: int, now: datetime, token: str,
                    lease_seconds: float, max_attempts: int) -> list:
    """Rows whose claim's lease ran out: failed if that was their last attempt, else claimed again.

    A statement of its own: an OR with the pending rows would keep the claim off the partial
    index of pending rows per job.
    """
    n = Notification
    session.execute(_of_job(update(n).where(_lost(now, lease_seconds), n.attempts >= max_attempts), job).values(
        status=NotificationStatus.FAILED, claimed_at=None, next_attempt_at=None,
        error=f"worker lost while sending; gave up after {max_attempts} attempts"))
    picked = _of_job(select(n.id).where(_lost(now, lease_seconds)), job).order_by(n.id).limit(limit)
    return _claim(session, picked, NotificationStatus.SENDING, now, token)


def mark_sent_many(session: Session, sent: list[tuple[int, str]], now: datetime | None = None) -> int:
    """Record that the provider accepted these messages: ``[(notification id, provider id)]``.
    Returns how many rows changed.

    The messages *were* sent, so this holds whoever owns the claim now (a slow run whose
    claim the sweep gave away still records the truth); a row already ``sent`` or
    ``failed`` is left as it is.
    """
    if not sent:
        return 0
    t = Notification.__table__
    now = now or utcnow()
    stmt = (
        # OR rather than IN: an expanding IN cannot run as executemany.
        update(t).where(t.c.id == bindparam("nid"),
                        or_(t.c.status == NotificationStatus.SENDING, t.c.status == NotificationStatus.PENDING))
        .values(status=NotificationStatus.SENT, sent_at=now, provider_id=bindparam("pid"), error=None,
                claimed_at=None, next_attempt_at=None)
    )
    result = session.execute(stmt, [{"nid": nid, "pid": provider_id[:300]} for nid, provider_id in sent])
    _observe_lag(session, [nid for nid, _ in sent], now)
    return max(0, result.rowcount)


def _observe_lag(session: Session, ids: list[int], sent_at: datetime) -> None:
    """Created-to-sent lag of the rows just marked, per organization, once the marks commit."""
    t, j = Notification.__table__, ResetJob.__table__
    rows = session.execute(select(j.c.organization_id, t.c.created_at).join(j, j.c.id == t.c.reset_job_id)
                           .where(t.c.id.in_(ids), t.c.sent_at == sent_at)).all()
    lags = [(organization_id, (sent_at - as_utc(created_at)).total_seconds()) for organization_id, created_at in rows]
    on_commit(session, lambda: observe(NOTIFICATION_LAG, lags))


def mark_sent(session: Session, notification_id: int, provider_id: str, now: datetime | None = None) -> bool:
    """:func:`mark_sent_many` for one row; True if it changed."""
    return mark_sent_many(session, [(notification_id, provider_id)], now) == 1


def _owned(claim: ClaimedNotification):
    n = Notification
    return and_(n.id == claim.id, n.status == NotificationStatus.SENDING, n.attempts == claim.attempts,
                n.claimed_by == claim.token)


def mark_failed(session: Session, claim: ClaimedNotification, reason: str, now: datetime | None = None) -> bool:
    """Fail the row for good with ``reason`` (e-mail addresses removed). Only if the claim is still ours."""
    result = session.execute(
        update(Notification).where(_owned(claim))
        .values(status=NotificationStatus.FAILED, error=redact(reason), claimed_at=None, next_attempt_at=None)
    )
    return result.rowcount == 1


def mark_retry(
    session: Session,
    claim: ClaimedNotification,
    reason: str,
    settings: Settings,
    now: datetime | None = None,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> datetime | None:
    """After a transient failure: back to ``pending`` with a backed-off ``next_attempt_at``, or
    ``failed`` once ``notify_max_attempts`` attempts are used up.

    Returns the next attempt time, or None when the row failed (or the claim is no longer ours).
    """
    now = now or utcnow()
    if claim.attempts >= settings.notify_max_attempts:
        mark_failed(session, claim, f"gave up after {claim.attempts} attempts; last error: {reason}", now)
        return None
    next_at = now + timedelta(seconds=retry_delay(claim.attempts, retry_after, rng))
    result = session.execute(
        update(Notification).where(_owned(claim))
        .values(status=NotificationStatus.PENDING, error=redact(reason), claimed_at=None, next_attempt_at=next_at)
    )
    return next_at if result.rowcount == 1 else None


def release_notifications(session: Session, claims: list[ClaimedNotification], next_attempt_at: datetime) -> int:
    """Give back claimed rows that were never tried (the provider is down, the run is out of
    time): ``pending`` at ``next_attempt_at``, and the attempt is not counted."""
    n = Notification
    released = 0
    for claim in claims:
        result = session.execute(
            update(n).where(_owned(claim))
            .values(status=NotificationStatus.PENDING, claimed_at=None, next_attempt_at=next_attempt_at,
                    attempts=n.attempts - 1)
        )
        released += result.rowcount
    return released


def defer_due_notifications(session: Session, job_id: str | uuid.UUID | None, until: datetime) -> int:
    """Hold every ``pending`` row (of the job, or of any) due before ``until`` until then, without
    counting an attempt: the provider or the rate limiter cannot take them sooner."""
    n = Notification
    stmt = (update(n).where(n.status == NotificationStatus.PENDING,
                            or_(n.next_attempt_at.is_(None), n.next_attempt_at < until))
            .values(next_attempt_at=until))
    return session.execute(_of_job(stmt, _job_uuid(job_id))).rowcount


def next_due_at(session: Session, job_id: str | uuid.UUID | None, lease_seconds: float) -> datetime | None:
    """When the job's (or any job's) next row becomes claimable: a ``pending`` row falls due, or a
    claim's lease ends. None when nothing is pending or being sent."""
    n = Notification
    job = _job_uuid(job_id)
    pending = session.execute(_of_job(select(n.next_attempt_at).where(n.status == NotificationStatus.PENDING), job)
                              .order_by(n.next_attempt_at.asc().nulls_first()).limit(1)).first()  # NULL: due now
    claimed = session.scalar(_of_job(select(func.min(n.claimed_at)).where(n.status == NotificationStatus.SENDING), job))
    times = []
    if pending is not None:
        times.append(as_utc(pending.next_attempt_at) or datetime.min.replace(tzinfo=timezone.utc))
    if claimed is not None:
        times.append(as_utc(claimed) + timedelta(seconds=lease_seconds))
    return min(times) if times else None


def count_claimable(session: Session, job_id: str | uuid.UUID | None, limit: int, lease_seconds: float,
                    now: datetime) -> int:
    """How many rows of the job (or of any job) a claim would take now, at most ``limit``."""
    n = Notification
    job = _job_uuid(job_id)
    counted = 0
    for where in (_due(now), _lost(now, lease_seconds)):
        picked = _of_job(select(n.id).where(where), job).limit(limit - counted).subquery()
        counted += int(session.scalar(select(func.count()).select_from(picked)) or 0)
        if counted >= limit:
            break
    return counted


def wake_due_at(session: Session, job_id: str | uuid.UUID) -> datetime | None:
    """When the job's next dispatch is due (``notify_wake_at``), if one is scheduled."""
    return as_utc(session.scalar(select(ResetJob.notify_wake_at).where(ResetJob.id == _job_uuid(job_id))))


def claim_wake(session: Session, job_id: str | uuid.UUID, at: datetime, now: datetime) -> bool:
    """Become the job's next dispatch, due ``at``: True unless another one is already due earlier.

    One conditional UPDATE of ``reset_jobs.notify_wake_at``, so the sends a job's batches publish,
    redelivered messages and the sweep collapse into one chain per job instead of multiplying.
    """
    j = ResetJob.__table__
    return session.execute(
        update(j).where(j.c.id == _job_uuid(job_id),
                        or_(j.c.notify_wake_at.is_(None), j.c.notify_wake_at <= now, j.c.notify_wake_at > at))
        .values(notify_wake_at=at)
    ).rowcount == 1


def sweep_notifications(session: Session, lease_seconds: float, now: datetime | None = None,
                        settings: Settings | None = None) -> int:
    """Publish a send for every job whose notifications were left behind; returns how many rows wait.

    Left behind, of a job whose chain is not alive: ``pending`` rows due and never published, or
    whose publish was lost (created more than ``PUBLISH_STALE_SECONDS`` ago without a retry time,
    or past their retry time), ``pending`` rows due of a job whose chain stopped, and ``sending``
    rows whose claim's lease ran out (their worker was lost). A chain is alive while its next
    dispatch (``notify_wake_at``) is due in the future or less than a claim's lease ago; a
    dispatch that late was lost with its worker (a killed worker takes the messages it had
    prefetched along, and Redis gives them back only after the visibility timeout), and a
    dispatch published in its stead is harmless (the job's chains collapse into one). At most
    ``SWEEP_MAX_JOBS`` jobs a tick, the longest waiting first. Safe to run twice: the sends claim
    rows conditionally.
    """
    settings = settings or get_settings()
    now = now or utcnow()
    n, j = Notification, ResetJob.__table__
    unpublished_before = now - timedelta(seconds=settings.publish_stale_seconds)
    chain_lost_before = now - timedelta(seconds=lease_seconds)
    stopped = exists().where(j.c.id == n.reset_job_id, j.c.notify_wake_at < chain_lost_before)
    left = or_(and_(n.status == NotificationStatus.PENDING,
                    or_(and_(n.next_attempt_at.is_(None), or_(n.created_at < unpublished_before, stopped)),
                        n.next_attempt_at <= now)),
               _lost(now, lease_seconds))
    chain_alive = and_(j.c.id == n.reset_job_id, j.c.notify_wake_at >= chain_lost_before)
    rows = session.execute(
        select(n.reset_job_id, func.count(), func.min(n.id)).where(left, ~exists().where(chain_alive))
        .group_by(n.reset_job_id).order_by(func.min(n.id)).limit(SWEEP_MAX_JOBS)
    ).all()
    for job, _count, _first in rows:
        if claim_wake(session, job, now, now):
            publish_after_commit(session, TASK_NAME, [str(job)])
    total = sum(int(count) for _job, count, _first in rows)
    if rows:
        log_event("notification.sweep", due=total, jobs=len(rows))
    return total
