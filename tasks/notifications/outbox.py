"""The outbox rows of course-assigned notifications, and every change of their state.

Each function takes a Session, never commits and never talks to Celery or to a provider, so
the sender can keep its transactions short (claim, then record outcomes) and the maintenance
sweep can run :func:`sweep_notifications` inside its own transaction::

    pending --claim--> sending --mark_sent--> sent
                          |--mark_retry--> pending (next_attempt_at = retry_delay) ... --> failed (max attempts)
                          |--mark_failed--> failed (reason)
                          |--release_notifications--> pending (never tried, attempt not counted)
                          '--worker lost--> (sweep_notifications, after notify_stale_seconds) pending / failed

A claim is a conditional UPDATE, so concurrent claimers never hold the same row, and every
later write to a claimed row checks the claim's attempt, so a run whose claim the sweep gave
away cannot overwrite the row's new owner.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, bindparam, func, or_, select, update
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
from tasks.outbound import redact

TASK_NAME = "notifications.send"

# A row that failed transiently waits backoff_seconds(attempt, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS).
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# The sweep publishes one task per job with due rows, up to this many jobs (then one for any job).
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


def _job_uuid(job_id: str | uuid.UUID | None) -> uuid.UUID | None:
    return None if job_id is None else job_uuid(job_id)


def _of_job(stmt, job: uuid.UUID | None):
    return stmt if job is None else stmt.where(Notification.reset_job_id == job)


def _due(now: datetime):
    n = Notification
    return and_(n.status == NotificationStatus.PENDING, or_(n.next_attempt_at.is_(None), n.next_attempt_at <= now))


_RETURNED = (Notification.id, Notification.user_id, Notification.course_id, Notification.reset_job_id,
             Notification.kind, Notification.attempts)


def claim_notifications(
    session: Session, job_id: str | uuid.UUID | None = None, limit: int = 50, now: datetime | None = None,
    owner: str | None = None,
) -> list[ClaimedNotification]:
    """Claim up to ``limit`` due ``pending`` rows (of ``job_id``, or of any job): ``sending``,
    ``claimed_at = now``, one more attempt. Rows another transaction is claiming are skipped
    (``SKIP LOCKED``) on PostgreSQL; on SQLite, writers are serialised (``BEGIN IMMEDIATE``)
    and the ``status = 'pending'`` condition makes the claim conditional all the same.

    Safe to run concurrently: no row is claimed twice. The claim holds once committed.

    ``owner`` (the claiming message's id) is written on the rows; the same message delivered
    again because its worker died first takes back the ``sending`` rows it still holds, as a
    new attempt, instead of leaving them to the sweep for ``NOTIFY_STALE_SECONDS``.
    """
    now = now or utcnow()
    n = Notification
    job = _job_uuid(job_id)
    rows = _reclaim(session, job, now, owner) if owner is not None else []
    if len(rows) < limit:
        picked = _of_job(select(n.id).where(_due(now)), job).order_by(n.id).limit(limit - len(rows))
        if is_postgres(session):
            picked = picked.with_for_update(skip_locked=True)
        picked_cte = picked.cte("picked")
        rows += session.execute(
            update(n).where(n.id == picked_cte.c.id, n.status == NotificationStatus.PENDING)
            .values(status=NotificationStatus.SENDING, claimed_at=now, claimed_by=owner, attempts=n.attempts + 1)
            .returning(*_RETURNED)
        ).all()
    claimed = sorted((ClaimedNotification(*row) for row in rows), key=lambda c: c.id)
    if claimed:
        log_event("notification.claimed", job_id=str(job) if job else None, count=len(claimed))
    return claimed


def _reclaim(session: Session, job: uuid.UUID | None, now: datetime, owner: str) -> list:
    """The ``sending`` rows ``owner`` claimed before its worker died, taken back as a new attempt.

    A statement of its own: an OR with the pending rows would keep the claim off the partial
    index of pending rows per job.
    """
    n = Notification
    stmt = _of_job(update(n).where(n.status == NotificationStatus.SENDING, n.claimed_by == owner), job)
    return session.execute(stmt.values(claimed_at=now, attempts=n.attempts + 1).returning(*_RETURNED)).all()


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
    return and_(n.id == claim.id, n.status == NotificationStatus.SENDING, n.attempts == claim.attempts)


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


def next_due_at(session: Session, job_id: str | uuid.UUID | None = None) -> datetime | None:
    """When the earliest ``pending`` row (of the job, or of any) becomes due; None if none is pending."""
    n = Notification
    query = _of_job(select(n.next_attempt_at, n.id).where(n.status == NotificationStatus.PENDING), _job_uuid(job_id))
    # NULL (due now) sorts first.
    row = session.execute(query.order_by(n.next_attempt_at.asc().nulls_first()).limit(1)).first()
    if row is None:
        return None
    return as_utc(row.next_attempt_at) or datetime.min.replace(tzinfo=timezone.utc)


def sweep_notifications(session: Session, now: datetime | None = None, settings: Settings | None = None) -> int:
    """Make stale notification work runnable again and publish a send for it; returns rows re-queued.

    - ``sending`` rows claimed more than ``notify_stale_seconds`` ago (their worker died):
      back to ``pending`` and due now, or ``failed`` if they used up their attempts;
    - ``pending`` rows that are due and were never published, or whose publish was lost
      (created more than ``publish_stale_seconds`` ago with no retry time, or past their
      retry time).

    Publishes ``notifications.send [job_id]`` after commit for each job with such rows and
    no live claim (a job with one has a task working on it), and returns how many rows
    those sends will find. Safe to run twice: the sends claim rows conditionally.
    """
    settings = settings or get_settings()
    now = now or utcnow()
    n = Notification
    unpublished_before = now - timedelta(seconds=settings.publish_stale_seconds)
    due = session.execute(
        select(n.reset_job_id, func.count())
        .where(n.status == NotificationStatus.PENDING,
               or_(and_(n.next_attempt_at.is_(None), n.created_at < unpublished_before),
                   n.next_attempt_at <= now))
        .group_by(n.reset_job_id)
    ).all()
    per_job: dict[uuid.UUID, int] = {job: int(count) for job, count in due}
    stale_before = now - timedelta(seconds=settings.notify_stale_seconds)
    stale = and_(n.status == NotificationStatus.SENDING, n.claimed_at < stale_before)
    exhausted = session.execute(
        update(n).where(stale, n.attempts >= settings.notify_max_attempts)
        .values(status=NotificationStatus.FAILED, claimed_at=None,
                error=f"worker lost while sending; gave up after {settings.notify_max_attempts} attempts")
    ).rowcount
    # Counted after the due rows above, so a row is never counted twice.
    requeued = session.execute(
        update(n).where(stale).values(status=NotificationStatus.PENDING, claimed_at=None, next_attempt_at=None)
        .returning(n.reset_job_id)
    ).scalars().all()
    for job in requeued:
        per_job[job] = per_job.get(job, 0) + 1
    # A job with a live claim has a task working through it right now: it will reach these rows,
    # and publishing another task at every tick of a long backlog would only pile up tasks.
    busy = set(session.scalars(
        select(n.reset_job_id).where(n.status == NotificationStatus.SENDING, n.claimed_at >= stale_before).distinct()
    ).all()) if per_job else set()
    per_job = {job: count for job, count in per_job.items() if job not in busy}
    total = sum(per_job.values())
    if per_job:
        jobs = sorted(per_job, key=str)
        if len(jobs) > SWEEP_MAX_JOBS:
            publish_after_commit(session, TASK_NAME, [None])
        else:
            for job in jobs:
                publish_after_commit(session, TASK_NAME, [str(job)])
    if requeued or exhausted or total:
        log_event("notification.sweep", requeued_stale=len(requeued), failed_stale=exhausted, due=total,
                  jobs=len(per_job), busy_jobs=len(busy))
    return total
