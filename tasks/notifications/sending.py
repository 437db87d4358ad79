"""Sending due notifications, a short slice at a time: what one ``notifications.send`` run does.

The rows and their states are :mod:`tasks.notifications.outbox`'s; this module owns the
transactions around them and never holds one open while talking to the provider: claim a
chunk (commit), render it (:mod:`tasks.notifications.message`), send each message through the
shared rate limit (:mod:`tasks.ratelimit`) and a backend (:mod:`tasks.notifications.backends`), record the outcomes
(commit, sent rows grouped). A run stops after ``TASK_SLICE_SECONDS`` and publishes itself
again, so one task never holds a worker slot for long; a run that leaves rows waiting for a
retry publishes a follow-up with a countdown to the earliest one.

An unreachable database retries the whole task with backoff (``autoretry_for`` in
:mod:`tasks.base`); the one exception is recording sent rows, see :class:`_SentMarks`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from models.db import session_scope
from models.job_ids import job_uuid
from models.logs import log_event, logger
from models.messaging import publish_after_commit
from models.settings import Settings, get_settings
from models.times import utcnow
from models.tracing import link_jobs
from tasks.backoff import backoff_seconds
from tasks.base import DATABASE_UNAVAILABLE
from tasks.notifications.backends import (
    BackendConfigError,
    NotificationBackend,
    PermanentSendError,
    SendError,
    TransientSendError,
    make_backend,
)
from tasks.notifications.message import OutgoingMessage, render_notifications
from tasks.notifications.outbox import (
    RETRY_MAX_SECONDS,
    TASK_NAME,
    ClaimedNotification,
    claim_notifications,
    defer_due_notifications,
    mark_failed,
    mark_retry,
    mark_sent_many,
    next_due_at,
    release_notifications,
    retry_delay,
)
from tasks.ratelimit import RateLimiter, RateLimiterUnavailable, notification_rate_limiter

# A run waits at most this long for a rate-limit slot (and never past its slice of time,
# ``TASK_SLICE_SECONDS``); beyond it, the chunk goes back with a countdown.
MAX_RATE_WAIT_SECONDS = 10.0
# When the rate limiter itself is unreachable, rows go back for this long.
LIMITER_DOWN_RETRY_SECONDS = 5.0
# Sent rows are marked in groups of at most this many, or this long after the first send.
MARK_BATCH_SIZE = 25
MARK_MAX_DELAY_SECONDS = 0.2
# How long a worker keeps trying to record sent rows while the database is unreachable, and
# the backoff between tries (backoff_seconds with this base and cap).
MARK_RETRY_SECONDS = 60.0
MARK_RETRY_BASE_SECONDS = 0.2
MARK_RETRY_MAX_SECONDS = 5.0


def max_countdown_seconds(settings: Settings) -> float:
    """The longest countdown a follow-up task may carry: far below the broker's visibility
    timeout, because Redis delivers an unacknowledged (countdown) message again after it."""
    return min(RETRY_MAX_SECONDS, settings.visibility_timeout_seconds / 10)


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
    stopped_by: str = "drained"  # drained | budget | provider_unavailable | rate_limit | config | bad_arguments
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
    record the outcomes in short transactions (sent rows grouped, see :class:`_SentMarks`).
    Safe to run any number of times at once.
    """
    if job_id is not None:
        try:
            job_id = str(job_uuid(job_id))
        except ValueError:  # never matches a row: a message not made by this system
            log_event("notification.bad_task_args", logging.ERROR, job_id=str(job_id)[:64])
            return SendRunResult(job_id=None, stopped_by="bad_arguments")
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
                link_jobs(session, {claim.reset_job_id for claim in claims})  # this run serves their traces
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


class _SentMarks:
    """Sent rows waiting to be marked, written together in one short transaction.

    Marking each row in its own commit costs far more than sending to a fast provider, so
    marks are grouped: at most ``MARK_BATCH_SIZE`` rows or ``MARK_MAX_DELAY_SECONDS`` of sending,
    and always before the run waits for a rate-limit slot, records a failure or stops. A
    worker that dies loses at most that window of marks; those rows are sent again with the
    same Message-ID / Idempotency-Key, exactly as for a crash right after one send. While the
    database is unreachable, a group is retried for up to ``MARK_RETRY_SECONDS``, well inside
    ``NOTIFY_STALE_SECONDS``.
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
        deadline = time.monotonic() + MARK_RETRY_SECONDS
        tries = 0
        while True:
            # A database outage is waited out here, not left to the task's autoretry: the retried
            # task would take these rows back (same message id) and send them again.
            try:
                with _transaction() as session:
                    mark_sent_many(session, marks, utcnow())
                break
            except DATABASE_UNAVAILABLE as exc:
                tries += 1
                delay = backoff_seconds(tries, MARK_RETRY_BASE_SECONDS, MARK_RETRY_MAX_SECONDS)
                if time.monotonic() + delay > deadline:
                    raise
                log_event("notification.mark.retry", logging.WARNING, rows=len(marks), error=type(exc).__name__)
                time.sleep(delay)
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
            if not slots and time.monotonic() - started >= budget_seconds:
                # Slots already reserved are used first: they fall inside the run's budget (see
                # below), and a slot reserved and never used is lost to every worker.
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
                    # Slots for the next messages in one round trip. Half the remaining time for
                    # the wait (other workers' reservations come first) and half for the slots
                    # themselves, so every slot granted falls inside the run and none is wasted.
                    half = max(0.0, remaining / 2)
                    count = max(1, min(len(unsent), MARK_BATCH_SIZE, int(half * limiter.rate_per_second)))
                    reservation = limiter.reserve(min(MAX_RATE_WAIT_SECONDS, half), count)
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
    # Called from the run's ``finally``: an error here is logged, not raised, so it cannot hide
    # the run's own. A follow-up lost that way (database gone) is the sweep's to re-publish.
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
    except Exception:  # noqa: BLE001 - see above
        log_event("notification.followup_failed", logging.WARNING, exc_info=True, job_id=job_id)
