"""Course-assigned notifications: the outbox sender ``notifications.send`` and its sweep hook.

The reset batch writes one ``notifications`` row (``pending``) per notifiable
learner in its own transaction and publishes ``notifications.send [job_id]``
after commit. This module turns those rows into messages:

    pending --claim--> sending --send ok--> sent
                          |--transient--> pending (next_attempt_at = backoff) ... --> failed (max attempts)
                          |--permanent--> failed (reason)
                          '--worker lost--> (sweep, after notify_stale_seconds) pending / failed

Exactly one message per learner per reset, in effect:

- the outbox row is unique per (job, learner, kind), so there is one row to send;
- a claim is a conditional UPDATE (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so
  duplicate ``notifications.send`` deliveries claim disjoint rows and never send
  one row twice at the same time;
- a worker that dies after the provider accepted a message but before the row
  was marked leaves it ``sending``; the sweep makes it ``pending`` again and it is
  resent with the same SMTP Message-ID / webhook Idempotency-Key (and the same
  webhook body), by which the provider recognises and drops the duplicate.

The plain functions take a Session and never commit; :func:`send_due_notifications`
owns the short transactions (claim, then one per outcome) and never holds one
open while talking to the provider.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from models.db import session_scope
from models.jobs import as_utc, utcnow
from models.logs import log_event, logger
from models.schema import Course, Notification, User
from models.settings import Settings, get_settings
from models.messaging import publish_after_commit
from tasks.base import project_task
from tasks.notify_backends import (
    BackendConfigError,
    NotificationBackend,
    OutgoingMessage,
    PermanentSendError,
    SendError,
    TransientSendError,
    make_backend,
    redact,
)
from tasks.ratelimit import RateLimiter, RateLimiterUnavailable, notification_rate_limiter

TASK_NAME = "notifications.send"

# Backoff for transient failures: attempt n waits base * 2**(n-1), capped, with the upper
# half jittered (equal jitter) so a recovering provider is not hit by every worker at once.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# A run waits at most this long for a rate-limit slot (and never past its slice of time,
# ``TASK_SLICE_SECONDS``); beyond it, the chunk goes back with a countdown.
MAX_RATE_WAIT_SECONDS = 10.0
# When the rate limiter itself is unreachable, rows go back for this long.
LIMITER_DOWN_RETRY_SECONDS = 5.0
# Sent rows are marked in groups of at most this many, or this long after the first send.
MARK_BATCH_SIZE = 25
MARK_MAX_DELAY_SECONDS = 0.2
# The sweep publishes one task per job with due rows, up to this many jobs (then one for any job).
SWEEP_MAX_JOBS = 50


def max_countdown_seconds(settings: Settings) -> float:
    """The longest countdown a follow-up task may carry: far below the broker's visibility
    timeout, because Redis delivers an unacknowledged (countdown) message again after it."""
    return min(RETRY_MAX_SECONDS, settings.visibility_timeout_seconds / 10)


def retry_delay(attempts: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
    """Seconds before a row that failed transiently on attempt ``attempts`` is tried again.

    ``RETRY_BASE_SECONDS * 2**(attempts-1)``, capped at ``RETRY_MAX_SECONDS``, of which the
    upper half is random; never earlier than the provider's ``Retry-After``.
    """
    rng = rng or random
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1))
    delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


# --- plain functions (take a Session, never commit) --------------------------------------------

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
    if job_id is None or isinstance(job_id, uuid.UUID):
        return job_id
    return uuid.UUID(str(job_id))


def _due(now: datetime):
    n = Notification
    return and_(n.status == "pending", or_(n.next_attempt_at.is_(None), n.next_attempt_at <= now))


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
    returned = (n.id, n.user_id, n.course_id, n.reset_job_id, n.kind, n.attempts)
    rows = []
    if owner is not None:
        # Its own rows first, in a statement of their own: an OR with the pending rows would
        # keep the claim off the partial index of pending rows per job.
        mine = [n.status == "sending", n.claimed_by == owner]
        if job is not None:
            mine.append(n.reset_job_id == job)
        rows = session.execute(update(n).where(*mine).values(claimed_at=now, attempts=n.attempts + 1)
                               .returning(*returned)).all()
    if len(rows) < limit:
        picked = select(n.id).where(_due(now))
        if job is not None:
            picked = picked.where(n.reset_job_id == job)
        picked = picked.order_by(n.id).limit(limit - len(rows))
        if session.get_bind().dialect.name == "postgresql":
            picked = picked.with_for_update(skip_locked=True)
        picked_cte = picked.cte("picked")
        rows += session.execute(
            update(n).where(n.id == picked_cte.c.id, n.status == "pending")
            .values(status="sending", claimed_at=now, claimed_by=owner, attempts=n.attempts + 1)
            .returning(*returned)
        ).all()
    claimed = sorted((ClaimedNotification(*row) for row in rows), key=lambda c: c.id)
    if claimed:
        log_event("notification.claimed", job_id=str(job) if job else None, count=len(claimed))
    return claimed


def course_url(course_id: int, settings: Settings) -> str:
    return f"{settings.course_base_url}/{course_id}"


def render_notification(claim: ClaimedNotification, learner_name: str, learner_email: str, course_title: str,
                        settings: Settings) -> OutgoingMessage:
    """The "course assigned" message for one row: names the learner and the course, links to it."""
    url = course_url(claim.course_id, settings)
    text = (
        f"Hello {learner_name},\n"
        f"\n"
        f"The course \"{course_title}\" has been assigned to you again. Your earlier progress in it\n"
        f"was reset, so you can take it from the start.\n"
        f"\n"
        f"Open the course: {url}\n"
    )
    return OutgoingMessage(
        notification_id=claim.id, reset_job_id=str(claim.reset_job_id), user_id=claim.user_id,
        course_id=claim.course_id, kind=claim.kind, recipient_name=learner_name, recipient_email=learner_email,
        course_title=course_title, course_url=url, subject=f"Course assigned: {course_title}", text=text,
    )


def render_notifications(
    session: Session, claims: list[ClaimedNotification], settings: Settings
) -> tuple[list[tuple[ClaimedNotification, OutgoingMessage]], list[tuple[ClaimedNotification, str]]]:
    """Render a chunk with one query. Returns (renderable, unrenderable with the reason why)."""
    if not claims:
        return [], []
    user_ids = {c.user_id for c in claims}
    course_ids = {c.course_id for c in claims}
    users = {row.id: row for row in session.execute(
        select(User.id, User.name, User.email).where(User.id.in_(user_ids)))}
    courses = {row.id: row.title for row in session.execute(
        select(Course.id, Course.title).where(Course.id.in_(course_ids)))}
    ready, broken = [], []
    for claim in claims:
        user = users.get(claim.user_id)
        if user is None:
            broken.append((claim, f"learner {claim.user_id} no longer exists"))
        elif not user.email:
            broken.append((claim, f"learner {claim.user_id} has no e-mail address"))
        elif claim.course_id not in courses:
            broken.append((claim, f"course {claim.course_id} no longer exists"))
        else:
            ready.append((claim, render_notification(claim, user.name, user.email, courses[claim.course_id],
                                                     settings)))
    return ready, broken


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
    stmt = (
        update(t).where(t.c.id == bindparam("nid"), or_(t.c.status == "sending", t.c.status == "pending"))
        .values(status="sent", sent_at=now or utcnow(), provider_id=bindparam("pid"), error=None,
                claimed_at=None, next_attempt_at=None)
    )
    result = session.execute(stmt, [{"nid": nid, "pid": provider_id[:300]} for nid, provider_id in sent])
    return max(0, result.rowcount)


def mark_sent(session: Session, notification_id: int, provider_id: str, now: datetime | None = None) -> bool:
    """:func:`mark_sent_many` for one row; True if it changed."""
    return mark_sent_many(session, [(notification_id, provider_id)], now) == 1


def _owned(claim: ClaimedNotification):
    n = Notification
    return and_(n.id == claim.id, n.status == "sending", n.attempts == claim.attempts)


def mark_failed(session: Session, claim: ClaimedNotification, reason: str, now: datetime | None = None) -> bool:
    """Fail the row for good with ``reason`` (e-mail addresses removed). Only if the claim is still ours."""
    result = session.execute(
        update(Notification).where(_owned(claim))
        .values(status="failed", error=redact(reason), claimed_at=None, next_attempt_at=None)
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
        .values(status="pending", error=redact(reason), claimed_at=None, next_attempt_at=next_at)
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
            .values(status="pending", claimed_at=None, next_attempt_at=next_attempt_at, attempts=n.attempts - 1)
        )
        released += result.rowcount
    return released


def defer_due_notifications(session: Session, job_id: str | uuid.UUID | None, until: datetime) -> int:
    """Hold every ``pending`` row (of the job, or of any) due before ``until`` until then, without
    counting an attempt: the provider or the rate limiter cannot take them sooner."""
    n = Notification
    stmt = (update(n).where(n.status == "pending", or_(n.next_attempt_at.is_(None), n.next_attempt_at < until))
            .values(next_attempt_at=until))
    job = _job_uuid(job_id)
    if job is not None:
        stmt = stmt.where(n.reset_job_id == job)
    return session.execute(stmt).rowcount


def next_due_at(session: Session, job_id: str | uuid.UUID | None = None) -> datetime | None:
    """When the earliest ``pending`` row (of the job, or of any) becomes due; None if none is pending."""
    n = Notification
    query = select(n.next_attempt_at, n.id).where(n.status == "pending")
    job = _job_uuid(job_id)
    if job is not None:
        query = query.where(n.reset_job_id == job)
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
        .where(n.status == "pending",
               or_(and_(n.next_attempt_at.is_(None), n.created_at < unpublished_before),
                   n.next_attempt_at <= now))
        .group_by(n.reset_job_id)
    ).all()
    per_job: dict[uuid.UUID, int] = {job: int(count) for job, count in due}
    stale_before = now - timedelta(seconds=settings.notify_stale_seconds)
    stale = and_(n.status == "sending", n.claimed_at < stale_before)
    exhausted = session.execute(
        update(n).where(stale, n.attempts >= settings.notify_max_attempts)
        .values(status="failed", claimed_at=None,
                error=f"worker lost while sending; gave up after {settings.notify_max_attempts} attempts")
    ).rowcount
    # Counted after the due rows above, so a row is never counted twice.
    requeued = session.execute(
        update(n).where(stale).values(status="pending", claimed_at=None, next_attempt_at=None)
        .returning(n.reset_job_id)
    ).scalars().all()
    for job in requeued:
        per_job[job] = per_job.get(job, 0) + 1
    # A job with a live claim has a task working through it right now: it will reach these rows,
    # and publishing another task at every tick of a long backlog would only pile up tasks.
    busy = set(session.scalars(
        select(n.reset_job_id).where(n.status == "sending", n.claimed_at >= stale_before).distinct()
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


# --- the sending loop (owns its transactions) --------------------------------------------------

@contextmanager
def _transaction() -> Iterator[Session]:
    """One short transaction of the sending loop.

    Committed durably (no asynchronous commit): a claim or a sent mark that PostgreSQL
    acknowledged survives its restart, so a restart never makes rows look unsent that were
    sent. What a crash can still send twice is bounded by the marks' grouping
    (:class:`_SentMarks`; docs/reliability.md).
    """
    with session_scope() as session:
        yield session


@dataclass
class SendRunResult:
    job_id: str | None
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    followup_countdown: float | None = None
    stopped_by: str = "drained"  # drained | budget | provider_unavailable | rate_limit | config
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def send_due_notifications(
    job_id: str | None = None,
    settings: Settings | None = None,
    backend: NotificationBackend | None = None,
    limiter: RateLimiter | None = None,
    budget_seconds: float | None = None,
    owner: str | None = None,
) -> SendRunResult:
    """Send the due notifications of ``job_id`` (or of any job), chunk by chunk, until none is
    due or ``budget_seconds`` have passed; then publish a follow-up if work remains.

    Each chunk: claim (commit), send each message through the rate limiter and the backend,
    record each outcome in its own short transaction. Safe to run any number of times at once.
    """
    settings = settings or get_settings()
    if budget_seconds is None:
        # One run holds its worker slot for about this long, then hands the rest back to the
        # queue, so one worker on every queue still serves the others promptly.
        budget_seconds = settings.task_slice_seconds
    started = time.monotonic()
    result = SendRunResult(job_id=job_id)
    own_backend = backend is None
    try:
        backend = backend or make_backend(settings)
    except BackendConfigError as exc:
        # Nothing is claimed, so the rows wait (pending) until the configuration is fixed.
        log_event("notification.backend_misconfigured", logging.ERROR, job_id=job_id,
                  backend=settings.notify_backend, error=str(exc))
        result.stopped_by = "config"
        return result
    limiter = limiter or notification_rate_limiter(settings)
    try:
        while True:
            if time.monotonic() - started >= budget_seconds:
                result.stopped_by = "budget"
                break
            with _transaction() as session:
                claims = claim_notifications(session, job_id, settings.notify_chunk_size, utcnow(), owner=owner)
                ready, broken = render_notifications(session, claims, settings)
                for claim, reason in broken:
                    mark_failed(session, claim, reason)
                    result.failed += 1
                    log_event("notification.failed", logging.WARNING, notification_id=claim.id,
                              job_id=str(claim.reset_job_id), code="unrenderable", attempts=claim.attempts)
            if not claims:
                break
            result.claimed += len(claims)
            if not _send_chunk(ready, backend, limiter, settings, started, budget_seconds, result):
                break
    finally:
        if own_backend:
            backend.close()
        result.seconds = time.monotonic() - started
        _publish_followup(job_id, settings, result)
        log_event("notification.run", job_id=job_id, claimed=result.claimed, sent=result.sent,
                  retried=result.retried, failed=result.failed, released=result.released,
                  stopped_by=result.stopped_by, seconds=round(result.seconds, 3))
    return result


# How long a worker keeps retrying to record sent rows while the database is unreachable.
MARK_RETRY_SECONDS = 60.0


class _SentMarks:
    """Sent rows waiting to be marked, written together in one short transaction.

    Marking each row in its own commit costs far more than sending to a fast provider, so
    marks are grouped: at most ``MARK_BATCH_SIZE`` rows or ``MARK_MAX_DELAY_SECONDS`` of sending,
    and always before the run waits for a rate-limit slot, records a failure or stops. A
    worker that dies loses at most that window of marks; those rows are sent again with the
    same Message-ID / Idempotency-Key, exactly as for a crash right after one send.
    """

    def __init__(self, result: SendRunResult):
        self.result = result
        self.items: list[tuple[ClaimedNotification, str]] = []
        self.since = 0.0

    def add(self, claim: ClaimedNotification, provider_id: str) -> None:
        if not self.items:
            self.since = time.monotonic()
        self.items.append((claim, provider_id))
        if len(self.items) >= MARK_BATCH_SIZE or time.monotonic() - self.since >= MARK_MAX_DELAY_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        marks = [(claim.id, provider_id) for claim, provider_id in items]
        # These messages are already with the provider: keep trying to record that while
        # the database is unreachable (restart, terminated connection) rather than let the
        # sweep send them again. Well inside NOTIFY_STALE_SECONDS.
        deadline = time.monotonic() + MARK_RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                with _transaction() as session:
                    mark_sent_many(session, marks, utcnow())
                break
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log_event("notification.mark.retry", logging.WARNING, rows=len(marks), error=type(exc).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.result.sent += len(items)
        if logger.isEnabledFor(logging.DEBUG):  # at info, the run's own line carries the counts
            for claim, _ in items:
                log_event("notification.sent", logging.DEBUG, notification_id=claim.id,
                          job_id=str(claim.reset_job_id))


def _send_chunk(
    ready: list[tuple[ClaimedNotification, OutgoingMessage]],
    backend: NotificationBackend,
    limiter: RateLimiter,
    settings: Settings,
    started: float,
    budget_seconds: float,
    result: SendRunResult,
) -> bool:
    """Send one claimed chunk. False when the run must stop (its unsent rows were given back)."""
    marks = _SentMarks(result)
    slots = 0  # slots reserved and not used yet; the next one starts at next_slot
    next_slot = 0.0
    try:
        for index, (claim, message) in enumerate(ready):
            unsent = [c for c, _ in ready[index:]]
            if time.monotonic() - started >= budget_seconds:
                marks.flush()
                _give_back(unsent, utcnow(), result, "budget")
                return False
            if slots:
                wait = max(0.0, next_slot - time.monotonic())
                if wait:
                    marks.flush()  # use the wait: nothing sent stays unmarked while we sleep
                    time.sleep(wait)
                slots -= 1
                next_slot += limiter.interval
            else:
                try:
                    remaining = budget_seconds - (time.monotonic() - started)
                    # Slots for the next messages in one round trip: no more than fit in the
                    # run's remaining time, so a run that stops on time wastes few.
                    count = max(1, min(len(unsent), MARK_BATCH_SIZE,
                                       int(remaining * limiter.rate_per_second)))
                    reservation = limiter.reserve(max(0.0, min(MAX_RATE_WAIT_SECONDS, remaining)), count)
                except RateLimiterUnavailable as exc:
                    log_event("notification.rate_limiter_unavailable", logging.WARNING, job_id=result.job_id,
                              error=str(exc))
                    marks.flush()
                    _give_back(unsent, utcnow() + timedelta(seconds=LIMITER_DOWN_RETRY_SECONDS), result,
                               "rate_limit", defer_due=True)
                    return False
                if not reservation.granted:
                    marks.flush()
                    _give_back(unsent, utcnow() + timedelta(seconds=reservation.wait), result, "rate_limit",
                               defer_due=True)
                    return False
                slot = time.monotonic() + reservation.wait
                if reservation.wait > 0:
                    marks.flush()  # use the wait: nothing sent stays unmarked while we sleep
                    time.sleep(max(0.0, slot - time.monotonic()))
                slots = count - 1
                next_slot = slot + limiter.interval
            try:
                provider_id = _send_one(backend, message)
            except SendError as exc:
                marks.flush()
                next_at = _record_failure(claim, exc, settings, result)
                if isinstance(exc, TransientSendError) and exc.affects_all:
                    # The provider is unwell: every other message would fail the same way now.
                    # Give back the rest of the chunk (no attempt counted) and hold the due rows
                    # until this one is tried again, so no task spins against a dead provider.
                    until = next_at or utcnow() + timedelta(seconds=retry_delay(claim.attempts, exc.retry_after))
                    _give_back(unsent[1:], until, result, "provider_unavailable", defer_due=True)
                    return False
                continue
            marks.add(claim, provider_id)
    finally:
        marks.flush()
    return True


def _send_one(backend: NotificationBackend, message: OutgoingMessage) -> str:
    try:
        return backend.send(message)
    except SendError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug or an input the backend did not foresee
        # Counted as a transient failure of this message only: it is retried and, if it keeps
        # failing, ends ``failed`` with this reason instead of wedging every run that claims it.
        log_event("notification.backend_error", logging.ERROR, exc_info=True, notification_id=message.notification_id,
                  job_id=message.reset_job_id)
        raise TransientSendError(f"unexpected {type(exc).__name__} in the {backend.name} backend",
                                 "backend_error") from exc


def _record_failure(claim: ClaimedNotification, exc: SendError, settings: Settings,
                    result: SendRunResult) -> datetime | None:
    """Store the outcome of a failed send; returns when the row is tried again (None: failed)."""
    result.errors[exc.code] = result.errors.get(exc.code, 0) + 1
    with _transaction() as session:
        if isinstance(exc, PermanentSendError):
            mark_failed(session, claim, exc.reason)
            next_at = None
        else:
            next_at = mark_retry(session, claim, exc.reason, settings, retry_after=exc.retry_after)
    job = str(claim.reset_job_id)
    if next_at is None:
        result.failed += 1
        log_event("notification.failed", logging.WARNING, notification_id=claim.id, job_id=job, code=exc.code,
                  attempts=claim.attempts)
    else:
        result.retried += 1
        log_event("notification.retry", notification_id=claim.id, job_id=job, code=exc.code,
                  attempts=claim.attempts, next_attempt_at=next_at.isoformat())
    return next_at


def _give_back(unsent: list[ClaimedNotification], until: datetime, result: SendRunResult, stopped_by: str,
               defer_due: bool = False) -> None:
    """Stop the run: unsent claimed rows back to ``pending`` at ``until`` (and, with
    ``defer_due``, the run's other due rows too), in one transaction."""
    result.stopped_by = stopped_by
    with _transaction() as session:
        result.released += release_notifications(session, unsent, until)
        if defer_due:
            defer_due_notifications(session, result.job_id, until)


def _publish_followup(job_id: str | None, settings: Settings, result: SendRunResult) -> None:
    """Keep the job's notifications moving without waiting for the sweep.

    Out of budget: publish again now. Otherwise, if this run claimed anything and rows
    are still pending, publish with a countdown to when the earliest one is due (if that
    is within :func:`max_countdown_seconds`; later ones are the sweep's). A run that
    claimed nothing publishes nothing, so duplicate tasks die out instead of multiplying.
    """
    if result.stopped_by == "config":
        return
    try:
        with session_scope() as session:
            if result.stopped_by == "budget":
                countdown = 0.0
            elif result.claimed:
                due = next_due_at(session, job_id)
                if due is None:
                    return
                countdown = max(0.0, (due - utcnow()).total_seconds()) + 0.05
                if countdown > max_countdown_seconds(settings):
                    return
            else:
                return
            result.followup_countdown = round(countdown, 3)
            options = {"countdown": result.followup_countdown} if countdown > 0.05 else {}
            publish_after_commit(session, TASK_NAME, [job_id], **options)
    except Exception:  # noqa: BLE001 - the database is gone; the sweep re-publishes later
        log_event("notification.followup_failed", logging.WARNING, exc_info=True, job_id=job_id)


# --- the task ---------------------------------------------------------------------------------

@project_task(TASK_NAME, bind=True)
def send_notifications(self, job_id: str | None = None) -> None:
    """``notifications.send(job_id=None)``: send the job's due notifications (any job's when None)."""
    if job_id is not None:
        try:
            job_id = str(uuid.UUID(str(job_id)))
        except ValueError:
            log_event("notification.bad_task_args", logging.ERROR, job_id=str(job_id)[:64])
            return
    send_due_notifications(job_id, owner=self.request.id)
