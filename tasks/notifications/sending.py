"""Sending one claimed group of notifications: what the courier does with it, off the pool.

The group was claimed by :mod:`tasks.notifications.dispatching` under a lease, and its rate-limit
slots were reserved for now. Here each message goes to the backend (:mod:`~tasks.notifications.backends`),
which ends it by its total deadline, and the outcomes are recorded in short transactions, sent
rows grouped (:class:`_SentMarks`). No transaction is open while talking to the provider.

A message is started only while the rest of the claim's lease outlasts its deadline, so a row
is never sent after its claim could have been taken over; the rest of the group is given back,
not counted as an attempt. A failure that says the provider itself is unwell gives back the rest
and holds the job's due rows until it is tried again, so no chain of sends spins against it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from models.db import session_scope
from models.logs import log_event, logger
from models.settings import Settings
from models.times import utcnow
from tasks.backoff import backoff_seconds
from tasks.base import DATABASE_UNAVAILABLE
from tasks.notifications.backends import (
    NotificationBackend,
    PermanentSendError,
    SendError,
    TransientSendError,
    make_backend,
    send_deadline_seconds,
)
from tasks.notifications.message import OutgoingMessage
from tasks.notifications.outbox import (
    ClaimedNotification,
    defer_due_notifications,
    mark_failed,
    mark_retry,
    mark_sent_many,
    release_notifications,
    retry_delay,
)

# A claim owns its rows for the send's total deadline plus this margin.
LEASE_MARGIN_SECONDS = 5.0
# The longest a group waits on its courier thread for its slots (a countdown step), well inside the margin.
MAX_SLOT_WAIT_SECONDS = 1.5
# Sent rows are marked in groups of at most this many, or this long after the first send.
MARK_BATCH_SIZE = 25
MARK_MAX_DELAY_SECONDS = 0.2
# How long a worker keeps trying to record sent rows while the database is unreachable, and
# the backoff between tries (backoff_seconds with this base and cap).
MARK_RETRY_SECONDS = 60.0
MARK_RETRY_BASE_SECONDS = 0.2
MARK_RETRY_MAX_SECONDS = 5.0

_backends = threading.local()


def claim_lease_seconds(settings: Settings) -> float:
    """How long a claim owns its rows: longer than one send can last with the configured backend."""
    return send_deadline_seconds(settings) + LEASE_MARGIN_SECONDS


@contextmanager
def _transaction() -> Iterator[Session]:
    """One short transaction of the sending.

    Committed durably (no asynchronous commit): a claim or a sent mark that PostgreSQL
    acknowledged survives its restart, so a restart never makes rows look unsent that were
    sent. What a crash can still send twice is bounded by the marks' grouping
    (:class:`_SentMarks`; docs/reliability.md).
    """
    with session_scope() as session:
        yield session


@dataclass
class GroupResult:
    job_id: str | None
    sent: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    stopped_by: str = "sent"  # sent | lease | provider_unavailable
    errors: dict[str, int] = field(default_factory=dict)


def thread_backend(settings: Settings) -> NotificationBackend:
    """This thread's backend for ``settings`` (a connection is reused by the groups one thread sends)."""
    cached = getattr(_backends, "cached", None)
    if cached is None or cached[0] is not settings:
        if cached is not None:
            cached[1].close()
        _backends.cached = (settings, make_backend(settings))
    return _backends.cached[1]


def send_group(ready: list[tuple[ClaimedNotification, OutgoingMessage]], settings: Settings, lease_ends: float,
               backend: NotificationBackend | None = None, not_before: float | None = None) -> GroupResult:
    """Send a claimed group, one message after another, and record every outcome.

    ``lease_ends`` is the ``time.monotonic()`` at which the claim's lease ends; ``not_before``
    (Unix seconds) when the group's rate-limit slots are due, at most a countdown step away
    (the dispatch's broker cannot deliver sooner): this thread waits for it. Safe to lose at
    any point: unrecorded rows are taken back once their lease ended, and resent with the same
    Message-ID / Idempotency-Key, by which the provider drops the duplicate.
    """
    if not_before is not None:
        time.sleep(max(0.0, min(not_before - time.time(), MAX_SLOT_WAIT_SECONDS)))
    job_id = str(ready[0][0].reset_job_id) if ready else None
    result = GroupResult(job_id=job_id)
    backend = backend or thread_backend(settings)
    deadline = send_deadline_seconds(settings)
    marks = _SentMarks(result)
    try:
        for index, (claim, message) in enumerate(ready):
            unsent = [c for c, _ in ready[index:]]
            if time.monotonic() + deadline > lease_ends:
                marks.flush()
                _give_back(unsent, utcnow(), result, "lease")
                break
            try:
                provider_id = _send_one(backend, message)
            except SendError as exc:
                marks.flush()
                next_at = _record_failure(claim, exc, settings, result)
                if isinstance(exc, TransientSendError) and exc.affects_all:
                    # The provider is unwell: every other message would fail the same way now. Give
                    # back the rest (no attempt counted) and hold the job's due rows until this one
                    # is tried again.
                    until = next_at or utcnow() + timedelta(seconds=retry_delay(claim.attempts, exc.retry_after))
                    _give_back(unsent[1:], until, result, "provider_unavailable", defer_due=True)
                    break
                continue
            marks.add(claim, provider_id)
    finally:
        marks.flush()
        log_event("notification.group", job_id=job_id, sent=result.sent, retried=result.retried,
                  failed=result.failed, released=result.released, stopped_by=result.stopped_by)
    return result


class _SentMarks:
    """Sent rows waiting to be marked, written together in one short transaction.

    Marking each row in its own commit costs far more than sending to a fast provider, so
    marks are grouped: at most ``MARK_BATCH_SIZE`` rows or ``MARK_MAX_DELAY_SECONDS`` of sending,
    and always before a failure is recorded or the group stops. A worker that dies loses at
    most that window of marks; those rows are sent again with the same Message-ID /
    Idempotency-Key, exactly as for a crash right after one send. While the database is
    unreachable, a group of marks is retried for up to ``MARK_RETRY_SECONDS``; a mark records
    what happened whoever owns the row by then.
    """

    def __init__(self, result: GroupResult):
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
            # A database outage is waited out here, on the courier's thread: the messages were
            # sent, and only this write says so.
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
                    result: GroupResult) -> datetime | None:
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


def _give_back(unsent: list[ClaimedNotification], until: datetime, result: GroupResult, stopped_by: str,
               defer_due: bool = False) -> None:
    """Unsent claimed rows back to ``pending`` at ``until`` (and, with ``defer_due``, the job's
    other due rows too), in one transaction; the attempt is not counted."""
    result.stopped_by = stopped_by
    with _transaction() as session:
        result.released += release_notifications(session, unsent, until)
        if defer_due and unsent:
            defer_due_notifications(session, unsent[0].reset_job_id, until)
