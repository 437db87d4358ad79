"""Celery entry points of the reset pipeline (thin: ids in, one plain function per transaction).

- ``resets.start(job_id)``      queue ``resets``: start the queued job whose turn it is (usually
  ``job_id``): claim + plan, then wake workers for its units.
- ``resets.work()``             queue ``reset_batches``: claim the unit (learner batch or purge
  chunk) whose turn it is, run it in one transaction, hand the turn on; the last unit of a job
  finalizes it in the same task.
- ``resets.finalize(job_id)``   queue ``resets``: exact analytics, final state, audit.
- ``resets.run_batch(job_id, batch_no)`` queue ``reset_batches``: one named batch (kept for
  messages already queued and for tools; the pipeline itself publishes ``resets.work``).
- ``resets.run_single(job_id, batch_no)`` queue ``resets``: a one-learner batch being retried.
- ``resets.purge(job_id, batch_no, cursor)`` queue ``reset_batches``: one chunk of a named purge
  batch (kept likewise).

Messages are wake-ups, not assignments: the database decides which unit runs next, so
organizations and jobs take turns whatever order the broker delivers in (decision record
0005). Every unit is about a second of work at most, so any worker topology serves every
queue promptly. A one-learner job is planned as one batch and run inline by
``resets.start`` on the ``resets`` queue, so it never waits behind a course-wide fan-out.

A task that cannot reach the database (refused, terminated or restarting
PostgreSQL) did no work: it is retried with backoff instead of failing, since a
failed task's message is acknowledged and only the maintenance sweep, minutes
later, would bring the work back.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import InterfaceError, OperationalError

from models.db import session_scope
from models.logs import log_event
from models.settings import get_settings
from models.states import JobState
from tasks import reset_steps
from models.messaging import publish_after_commit, send_now
from tasks.base import project_task


# Connection refused / terminated / lost (psycopg reports them as OperationalError,
# SQLAlchemy wraps a dead pooled connection as InterfaceError or OperationalError).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)

# How soon a wake-up that found only locked units looks again (a dead worker's transaction is
# rolled back as soon as PostgreSQL notices the closed connection: well under a second).
LOCKED_UNIT_RETRY_SECONDS = 0.5


def retry_later(task, job_id: str, exc: BaseException, attempts: int | None = None):
    """Retry ``task`` with backoff after a database error outside a batch's own transaction."""
    attempts = attempts if attempts is not None else task.request.retries + 1
    log_event("reset.task.database_unavailable", logging.WARNING, task=task.name, job_id=job_id,
              retry=attempts, error=type(exc).__name__)
    return task.retry(countdown=reset_steps.unit_backoff_seconds(attempts), exc=None)


@project_task("resets.start", bind=True, max_retries=None)
def start(self, job_id: str) -> None:
    """Start the queued job whose turn it is (each confirm publishes one start, so each runs)."""
    settings = get_settings()
    try:
        with session_scope() as session:
            key = reset_steps.next_queued_job(session)
            if key is None:
                log_event("reset.start.skipped", job_id=job_id)
                return
            # SQLite serialises writers, so parallel purge chains would only queue behind each other.
            partitions = settings.purge_partitions if settings.is_postgres else 1
            result = reset_steps.start_job(session, key, settings.batch_size, purge_partitions=partitions,
                                           purge_chunk_rows=settings.purge_chunk_rows,
                                           purge_min_rows=settings.purge_min_rows)
            if result.started and result.scope == "course":
                wake_workers(session, len(result.batch_nos) or 1)
    except DATABASE_UNAVAILABLE as exc:
        raise retry_later(self, job_id, exc) from None
    if not result.started:
        log_event("reset.start.skipped", job_id=job_id)
        return
    if result.scope == "learner":
        run_single_inline(result.job_id, result.batch_nos)


def run_single_inline(job_id: str, batch_nos: list[int]) -> None:
    """A one-learner job: same functions, same transactions, no extra hop through the broker."""
    for batch_no in batch_nos:
        try:
            execute_batch(job_id, batch_no)
        except (BatchFailed, *DATABASE_UNAVAILABLE) as failed:
            # The job is running now, so a retried start would skip it: retry the batch itself.
            send_now(batch_task_name("learner"), [job_id, batch_no],
                     countdown=reset_steps.unit_backoff_seconds(getattr(failed, "attempts", 1)))
            return
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE:
        send_now("resets.finalize", [job_id], countdown=reset_steps.unit_backoff_seconds(1))


def wake_workers(session, units: int) -> None:
    """After commit, publish up to ``RESET_WORK_TOKENS`` ``resets.work`` wake-ups for ``units`` new units.

    A wake-up that finds nothing to do ends without publishing, so surplus ones die out.
    """
    for _ in range(max(0, min(units, get_settings().work_tokens))):
        publish_after_commit(session, "resets.work", [])


def batch_task_name(scope: str) -> str:
    """One-learner batches stay on the ``resets`` queue; course-wide ones go to ``reset_batches``."""
    return "resets.run_single" if scope == "learner" else "resets.run_batch"


def publish_follow_ups(session, job_id: str, finalize: bool, purge: list[tuple[int, int]]) -> None:
    """After commit: wake-ups for the purge batches the learner phase released, or the finalize."""
    wake_workers(session, len(purge))
    if finalize:
        publish_after_commit(session, "resets.finalize", [job_id])


def execute_batch(job_id: str, batch_no: int, claim: reset_steps.ClaimResult | None = None,
                  finalize_inline: bool = False) -> reset_steps.BatchResult | None:
    """Claim (unless ``claim`` was committed already), run and commit one batch; publish
    notifications and the finalize after commit (or, with ``finalize_inline``, finalize here).

    On an error the attempt stays counted and the error is recorded; the caller
    retries (the task with backoff). Returns None when the batch is not runnable.
    """
    settings = get_settings()
    if claim is None:
        with session_scope() as session:
            claim = reset_steps.claim_batch(session, job_id, batch_no, settings.batch_max_attempts,
                                            settings.batch_lease_seconds)
            if claim.dead:
                publish_follow_ups(session, job_id, claim.job_complete, claim.purge)
    if not claim.runnable:
        return None
    started = time.perf_counter()
    try:
        with session_scope() as session:
            result = reset_steps.run_batch(session, job_id, batch_no)
            if result.notifications:
                publish_after_commit(session, "notifications.send", [job_id])
            finalize = result.job_complete or result.job_state == JobState.CANCELLING
            publish_follow_ups(session, job_id, finalize and not finalize_inline, result.purge)
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log_event("reset.batch.error", logging.WARNING, job_id=job_id, batch=batch_no, attempt=claim.attempts,
                  error=error)
        try:
            with session_scope() as session:
                reset_steps.record_batch_error(session, job_id, batch_no, error)
        except DATABASE_UNAVAILABLE:
            pass  # the database is gone: the attempt stays counted, only its reason is not kept
        raise BatchFailed(claim.attempts) from exc
    log_event("reset.batch.done", job_id=job_id, batch=batch_no, status=result.status, learners=result.learners,
              duration_ms=round((time.perf_counter() - started) * 1000, 1))
    if finalize_inline and (result.job_complete or result.job_state == JobState.CANCELLING):
        finalize_or_publish(job_id)
    return result


def finalize_or_publish(job_id: str) -> None:
    """Finalize now (the job's last unit just committed); if the database is unreachable, leave it
    to a ``resets.finalize`` message."""
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE:
        send_now("resets.finalize", [job_id], countdown=reset_steps.unit_backoff_seconds(1))


class BatchFailed(Exception):
    def __init__(self, attempts: int):
        super().__init__(f"batch attempt {attempts} failed")
        self.attempts = attempts


def _run_batch_with_retry(task, job_id: str, batch_no: int) -> None:
    try:
        execute_batch(job_id, int(batch_no))
    except BatchFailed as failed:
        # Backoff below the visibility timeout; the attempt limit lives in the
        # batch row, so the next claim dead-letters a batch that keeps failing.
        raise task.retry(countdown=reset_steps.unit_backoff_seconds(failed.attempts), exc=None) from None
    except DATABASE_UNAVAILABLE as exc:
        # The claim itself did not commit: no attempt was counted.
        raise retry_later(task, job_id, exc) from None


@project_task("resets.run_batch", bind=True, max_retries=None)
def run_batch(self, job_id: str, batch_no: int) -> None:
    """One named batch (a retry, or a tool); then hand the turn on like ``resets.work``."""
    _run_batch_with_retry(self, job_id, batch_no)
    send_now("resets.work", [])


@project_task("resets.run_single", bind=True, max_retries=None)
def run_single(self, job_id: str, batch_no: int) -> None:
    """The batch of a one-learner job, retried on the ``resets`` queue."""
    _run_batch_with_retry(self, job_id, batch_no)
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE as exc:
        raise retry_later(self, job_id, exc) from None  # the batch is done: the retry only finalizes


@project_task("resets.purge", bind=True, max_retries=None)
def purge(self, job_id: str, batch_no: int, cursor: int | None = None) -> None:
    """One chunk of a named purge batch; the rest is taken by ``resets.work`` wake-ups."""
    if run_purge_chunk(job_id, int(batch_no), cursor) == "progressed":
        send_now("resets.work", [])


def run_purge_chunk(job_id: str, batch_no: int, cursor: int | None = None,
                    finalize_inline: bool = False) -> str:
    """One purge chunk in one transaction; on failure count it and back off. Returns the step's status."""
    settings = get_settings()
    started = time.perf_counter()
    try:
        with session_scope() as session:
            result = reset_steps.purge_step(session, job_id, batch_no, cursor, settings.purge_chunk_rows,
                                            settings.batch_lease_seconds)
            finalize = (result.status == "done" and result.job_complete) or result.status == "cancelled"
            if finalize and not finalize_inline:
                publish_after_commit(session, "resets.finalize", [job_id])
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log_event("reset.purge.error", logging.WARNING, job_id=job_id, batch=batch_no, error=error)
        defer_failed_unit(job_id, batch_no, error, purge=True)
        return "failed"
    log_event("reset.purge.step", job_id=job_id, batch=batch_no, status=result.status, rows=result.deleted,
              duration_ms=round((time.perf_counter() - started) * 1000, 1))
    if finalize and finalize_inline:
        finalize_or_publish(job_id)
    return result.status


def defer_failed_unit(job_id: str, batch_no: int, error: str | None, purge: bool = False,
                      attempts: int = 1) -> None:
    """A unit failed: count it (a purge step here; a learner batch counted its attempt when claimed),
    dead-letter it past the limit, or hold it back for a backoff and publish a wake-up for then.

    When even that cannot be written (the database is unreachable), the unit itself is published
    again with the backoff, as its lease would keep wake-ups away from it.
    """
    settings = get_settings()
    countdown = reset_steps.unit_backoff_seconds(attempts)
    try:
        with session_scope() as session:
            if purge:
                failure = reset_steps.fail_purge_step(session, job_id, batch_no, error or "",
                                                      settings.batch_max_attempts)
                if failure.dead:
                    if failure.job_complete:
                        publish_after_commit(session, "resets.finalize", [job_id])
                    return
                countdown = reset_steps.unit_backoff_seconds(failure.attempts)
            elif error:
                reset_steps.record_batch_error(session, job_id, batch_no, error)
            reset_steps.defer_unit(session, job_id, batch_no, countdown)
    except DATABASE_UNAVAILABLE:
        log_event("reset.task.database_unavailable", logging.WARNING, job_id=job_id, batch=batch_no)
        if purge:
            send_now("resets.purge", [job_id, batch_no, None], countdown=countdown)
        else:
            send_now("resets.run_batch", [job_id, batch_no], countdown=countdown)
        return
    send_now("resets.work", [], countdown=countdown)


@project_task("resets.work", bind=True, max_retries=None)
def work(self, *_hint) -> None:
    """Run the unit whose turn it is, then hand the turn on with another wake-up.

    A wake-up that finds nothing to do ends here, so surplus wake-ups die out; one that did a
    unit publishes one more, so the work never lacks a wake-up while units remain.
    """
    settings = get_settings()
    try:
        with session_scope() as session:
            unit = reset_steps.claim_next_unit(session, settings.batch_max_attempts, settings.batch_lease_seconds,
                                               owner=self.request.id)
            if unit is not None and unit.claim.dead:
                publish_follow_ups(session, unit.job_id, unit.claim.job_complete, unit.claim.purge)
            # Nothing claimable, yet units are waiting: their rows are locked, typically by the
            # open transaction of a worker killed a moment ago (PostgreSQL rolls it back when it
            # notices). Come back shortly under the same message id, which takes such a unit back;
            # ending here could leave the job's last units with no wake-up at all.
            locked = unit is None and reset_steps.runnable_units(session, owner=self.request.id) > 0
    except DATABASE_UNAVAILABLE as exc:
        raise retry_later(self, "-", exc) from None
    if locked:
        raise self.retry(countdown=LOCKED_UNIT_RETRY_SECONDS, exc=None)
    if unit is None:
        return
    if unit.kind == "purge":
        status = run_purge_chunk(unit.job_id, unit.batch_no, finalize_inline=True)
        if status != "failed":
            send_now("resets.work", [])
        return
    if unit.claim.runnable:
        try:
            execute_batch(unit.job_id, unit.batch_no, claim=unit.claim, finalize_inline=True)
        except BatchFailed as failed:
            # execute_batch recorded the error; the attempt was counted by the claim.
            defer_failed_unit(unit.job_id, unit.batch_no, None, attempts=failed.attempts)
            return
        except DATABASE_UNAVAILABLE:
            send_now("resets.run_batch", [unit.job_id, unit.batch_no], countdown=reset_steps.unit_backoff_seconds(1))
            return
    send_now("resets.work", [])


def finalize_now(job_id: str) -> reset_steps.FinalizeResult:
    with session_scope() as session:
        return reset_steps.finalize_job(session, job_id)


@project_task("resets.finalize", bind=True, max_retries=None)
def finalize(self, job_id: str) -> None:
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE as exc:
        raise retry_later(self, job_id, exc) from None
