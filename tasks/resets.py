"""Celery entry points of the reset pipeline (thin: ids in, one plain function per transaction).

- ``resets.start(job_id)``      queue ``resets``: start the queued job whose turn it is (usually
  ``job_id``): claim + plan, then wake workers for its units.
- ``resets.work()``             queue ``reset_batches``: claim the unit (learner batch or purge
  chunk) whose turn it is, run it in one transaction, hand the turn on; the last unit of a job
  finalizes it in the same task.
- ``resets.finalize(job_id)``   queue ``resets``: exact analytics, final state, audit.
- ``resets.run_batch(job_id, batch_no)`` queue ``reset_batches``: one named batch (the sweep
  re-publishes stalled batches with it, and messages already queued use it; the pipeline itself
  publishes ``resets.work``).
- ``resets.run_single(job_id, batch_no)`` queue ``resets``: a one-learner batch being retried.
- ``resets.purge(job_id, batch_no, cursor)`` queue ``reset_batches``: one chunk of a named purge
  batch (kept likewise).

Messages are wake-ups, not assignments: the database decides which unit runs next, so
organizations and jobs take turns whatever order the broker delivers in (decision record
0005). Every unit is about a second of work at most, so any worker topology serves every
queue promptly. A one-learner job is planned as one batch and run inline by
``resets.start`` on the ``resets`` queue, so it never waits behind a course-wide fan-out.

Two retry policies, each written once:

- **The database is unreachable** (refused, terminated, restarting PostgreSQL): the task is
  retried under the same message id with Celery's backoff and jitter (``autoretry_for`` of
  :func:`tasks.base.project_task`). A retried ``resets.work`` first takes back the unit its id
  claimed (``claim_next_unit(owner=...)``), so a claimed unit is never dropped. The few handlers
  of ``DATABASE_UNAVAILABLE`` below are where a retry of the same task would not redo the work.
- **A unit failed** (a learner batch or purge chunk raised): it is held back by
  ``reset_steps.unit_backoff_seconds``, written as its lease (``defer_unit``) and used as the
  countdown of the wake-up or task retry that follows. The attempt limit lives in the batch row,
  so a unit that keeps failing is dead-lettered, not retried for ever.
"""

from __future__ import annotations

import logging
import time

from models.db import session_scope
from models.dialect import is_postgres
from models.logs import log_event
from models.messaging import publish_after_commit, send_now
from models.settings import get_settings
from models.states import BatchKind, JobScope, JobState
from tasks import reset_steps
from tasks.base import DATABASE_UNAVAILABLE, project_task
from tasks.reset_steps import Outcome

# How soon a wake-up that found only locked units looks again (a dead worker's transaction is
# rolled back as soon as PostgreSQL notices the closed connection: well under a second).
LOCKED_UNIT_RETRY_SECONDS = 0.5


@project_task("resets.start")
def start(job_id: str) -> None:
    """Start the queued job whose turn it is (each confirm publishes one start, so each runs)."""
    settings = get_settings()
    with session_scope() as session:
        key = reset_steps.next_queued_job(session)
        if key is None:
            log_event("reset.start.skipped", job_id=job_id)
            return
        # SQLite serialises writers, so parallel purge batches would only queue behind each other.
        partitions = settings.purge_partitions if is_postgres(session) else 1
        result = reset_steps.start_job(session, key, settings.batch_size, purge_partitions=partitions,
                                       purge_chunk_rows=settings.purge_chunk_rows,
                                       purge_min_rows=settings.purge_min_rows)
        if result.started and result.scope == JobScope.COURSE:
            wake_workers(session, len(result.batch_nos) or 1)
    if not result.started:
        log_event("reset.start.skipped", job_id=job_id)
        return
    if result.scope == JobScope.LEARNER:
        run_single_inline(result.job_id, result.batch_nos)


def run_single_inline(job_id: str, batch_nos: list[int]) -> None:
    """A one-learner job: same functions, same transactions, no extra hop through the broker."""
    for batch_no in batch_nos:
        try:
            execute_batch(job_id, batch_no)
        except (BatchFailed, *DATABASE_UNAVAILABLE) as failed:
            # The job is running now, so a retried start would skip it: retry the batch itself.
            send_now(batch_task_name(JobScope.LEARNER), [job_id, batch_no],
                     countdown=reset_steps.unit_backoff_seconds(getattr(failed, "attempts", 1)))
            return
    finalize_or_publish(job_id)


def wake_workers(session, units: int) -> None:
    """After commit, publish up to ``RESET_WORK_TOKENS`` ``resets.work`` wake-ups for ``units`` new units.

    A wake-up that finds nothing to do ends without publishing, so surplus ones die out.
    """
    for _ in range(max(0, min(units, get_settings().work_tokens))):
        publish_after_commit(session, "resets.work", [])


def batch_task_name(scope: str) -> str:
    """One-learner batches stay on the ``resets`` queue; course-wide ones go to ``reset_batches``."""
    return "resets.run_single" if scope == JobScope.LEARNER else "resets.run_batch"


def publish_follow_ups(session, job_id: str, finalize: bool, purge: list[tuple[int, int]]) -> None:
    """After commit: wake-ups for the purge batches the learner phase released, or the finalize."""
    wake_workers(session, len(purge))
    if finalize:
        publish_after_commit(session, "resets.finalize", [job_id])


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def execute_batch(job_id: str, batch_no: int, claim: reset_steps.ClaimResult | None = None,
                  finalize_inline: bool = False) -> reset_steps.BatchResult | None:
    """Claim (unless ``claim`` was committed already), run and commit one batch; publish
    notifications and the finalize after commit (or, with ``finalize_inline``, finalize here).

    An error in the batch's transaction raises :class:`BatchFailed`: the attempt stays counted and
    the error is recorded, and the caller backs the unit off. Returns None when the batch is not
    runnable.
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
        error = _error_text(exc)
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
    if finalize and finalize_inline:
        finalize_or_publish(job_id)
    return result


def finalize_or_publish(job_id: str) -> None:
    """Finalize now (the job's last unit just committed). If the database is unreachable, leave it
    to a ``resets.finalize`` message: a retry of the calling task would find its unit done and
    not finalize."""
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE:
        send_now("resets.finalize", [job_id])


class BatchFailed(Exception):
    def __init__(self, attempts: int):
        super().__init__(f"batch attempt {attempts} failed")
        self.attempts = attempts


def _run_batch_with_retry(task, job_id: str, batch_no: int) -> None:
    """Run one named batch; a failed attempt retries the task after the unit backoff (the next
    claim dead-letters a batch that has used up its attempts)."""
    try:
        execute_batch(job_id, int(batch_no))
    except BatchFailed as failed:
        raise task.retry(countdown=reset_steps.unit_backoff_seconds(failed.attempts), exc=None) from None


@project_task("resets.run_batch", bind=True)
def run_batch(self, job_id: str, batch_no: int) -> None:
    """One named batch (a retry, or a tool); then hand the turn on like ``resets.work``."""
    _run_batch_with_retry(self, job_id, batch_no)
    send_now("resets.work", [])


@project_task("resets.run_single", bind=True)
def run_single(self, job_id: str, batch_no: int) -> None:
    """The batch of a one-learner job, retried on the ``resets`` queue; then the finalize (a retry
    after the batch committed finds it done and only finalizes)."""
    _run_batch_with_retry(self, job_id, batch_no)
    finalize_now(job_id)


@project_task("resets.purge")
def purge(job_id: str, batch_no: int, cursor: int | None = None) -> None:
    """One chunk of a named purge batch; the rest is taken by ``resets.work`` wake-ups."""
    if run_purge_chunk(job_id, int(batch_no), cursor) == Outcome.PROGRESSED:
        send_now("resets.work", [])


def run_purge_chunk(job_id: str, batch_no: int, cursor: int | None = None,
                    finalize_inline: bool = False) -> str:
    """One purge chunk in one transaction; on failure count it and back off. Returns the step's outcome."""
    settings = get_settings()
    started = time.perf_counter()
    try:
        with session_scope() as session:
            result = reset_steps.purge_step(session, job_id, batch_no, cursor, settings.purge_chunk_rows,
                                            settings.batch_lease_seconds)
            finalize = ((result.status == Outcome.DONE and result.job_complete)
                        or result.status == Outcome.CANCELLED)
            if finalize and not finalize_inline:
                publish_after_commit(session, "resets.finalize", [job_id])
    except Exception as exc:
        error = _error_text(exc)
        log_event("reset.purge.error", logging.WARNING, job_id=job_id, batch=batch_no, error=error)
        defer_failed_unit(job_id, batch_no, purge_error=error)
        return Outcome.FAILED
    log_event("reset.purge.step", job_id=job_id, batch=batch_no, status=result.status, rows=result.deleted,
              duration_ms=round((time.perf_counter() - started) * 1000, 1))
    if finalize and finalize_inline:
        finalize_or_publish(job_id)
    return result.status


def defer_failed_unit(job_id: str, batch_no: int, purge_error: str | None = None, attempts: int = 1) -> None:
    """A unit failed: hold it back for the unit backoff and publish a wake-up for then.

    A purge chunk's failure is counted here (``purge_error``) and may dead-letter it; a learner
    batch counted its attempt when it was claimed (``attempts``). If the database is unreachable
    this raises, and the calling task is retried under its own id (a ``resets.work`` takes its
    unit back; a ``resets.purge`` runs its chunk again).
    """
    with session_scope() as session:
        if purge_error is not None:
            failure = reset_steps.fail_purge_step(session, job_id, batch_no, purge_error,
                                                  get_settings().batch_max_attempts)
            if failure.dead:
                if failure.job_complete:
                    publish_after_commit(session, "resets.finalize", [job_id])
                return
            attempts = failure.attempts
        countdown = reset_steps.unit_backoff_seconds(attempts)
        reset_steps.defer_unit(session, job_id, batch_no, countdown)
    send_now("resets.work", [], countdown=countdown)


@project_task("resets.work", bind=True)
def work(self, *_hint) -> None:
    """Run the unit whose turn it is, then hand the turn on with another wake-up.

    A wake-up that finds nothing to do ends here, so surplus wake-ups die out; one that did a
    unit publishes one more, so the work never lacks a wake-up while units remain.
    """
    settings = get_settings()
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
    if locked:
        raise self.retry(countdown=LOCKED_UNIT_RETRY_SECONDS, exc=None)
    if unit is None:
        return
    if unit.kind == BatchKind.PURGE:
        if run_purge_chunk(unit.job_id, unit.batch_no, finalize_inline=True) != Outcome.FAILED:
            send_now("resets.work", [])
        return
    if unit.claim.runnable:
        try:
            execute_batch(unit.job_id, unit.batch_no, claim=unit.claim, finalize_inline=True)
        except BatchFailed as failed:
            # execute_batch recorded the error; the attempt was counted by the claim.
            defer_failed_unit(unit.job_id, unit.batch_no, attempts=failed.attempts)
            return
    send_now("resets.work", [])


def finalize_now(job_id: str) -> reset_steps.FinalizeResult:
    with session_scope() as session:
        return reset_steps.finalize_job(session, job_id)


@project_task("resets.finalize")
def finalize(job_id: str) -> None:
    finalize_now(job_id)
