"""Celery entry points of the reset pipeline (thin: ids in, one plain function per transaction).

- ``resets.start(job_id)``      queue ``resets``: claim + plan, then publish every batch.
- ``resets.run_batch(job_id, batch_no)`` queue ``reset_batches``: one batch in one transaction.
- ``resets.finalize(job_id)``   queue ``resets``: exact analytics, final state, audit.
- ``resets.run_single(job_id, batch_no)`` queue ``resets``: a one-learner batch being retried.
- ``resets.purge(job_id, batch_no, cursor)`` queue ``reset_batches``: one chunk of a component's
  pre-job rows in id order; publishes the next chunk with the new cursor.

A one-learner job is planned as one batch and run inline by ``resets.start``
on the ``resets`` queue, so it never waits behind a course-wide fan-out.

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
from tasks import reset_steps
from tasks.base import project_task, publish_after_commit, send_now


# Connection refused / terminated / lost (psycopg reports them as OperationalError,
# SQLAlchemy wraps a dead pooled connection as InterfaceError or OperationalError).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


def retry_later(task, job_id: str, exc: BaseException, attempts: int | None = None):
    """Retry ``task`` with backoff after a database error outside a batch's own transaction."""
    attempts = attempts if attempts is not None else task.request.retries + 1
    log_event("reset.task.database_unavailable", logging.WARNING, task=task.name, job_id=job_id,
              retry=attempts, error=type(exc).__name__)
    return task.retry(countdown=reset_steps.retry_countdown(attempts), exc=None)


@project_task("resets.start", bind=True, max_retries=None)
def start(self, job_id: str) -> None:
    settings = get_settings()
    try:
        with session_scope() as session:
            # SQLite serialises writers, so parallel purge chains would only queue behind each other.
            partitions = settings.purge_partitions if settings.is_postgres else 1
            result = reset_steps.start_job(session, job_id, settings.batch_size, purge_partitions=partitions)
    except DATABASE_UNAVAILABLE as exc:
        raise retry_later(self, job_id, exc) from None
    if not result.started:
        log_event("reset.start.skipped", job_id=job_id)
        return
    if result.scope == "learner":
        # Same functions, same transactions, no extra hop through the broker.
        for batch_no in result.batch_nos:
            try:
                execute_batch(job_id, batch_no)
            except (BatchFailed, *DATABASE_UNAVAILABLE) as failed:
                # The job is running now, so a retried start would skip it: retry the batch itself.
                send_now(batch_task_name("learner"), [job_id, batch_no],
                         countdown=reset_steps.retry_countdown(getattr(failed, "attempts", 1)))
                return
        try:
            finalize_now(job_id)
        except DATABASE_UNAVAILABLE:
            send_now("resets.finalize", [job_id], countdown=reset_steps.retry_countdown(1))
        return
    for batch_no in result.batch_nos:
        send_now("resets.run_batch", [job_id, batch_no])
    if not result.batch_nos:
        send_now("resets.finalize", [job_id])


def batch_task_name(scope: str) -> str:
    """One-learner batches stay on the ``resets`` queue; course-wide ones go to ``reset_batches``."""
    return "resets.run_single" if scope == "learner" else "resets.run_batch"


def publish_follow_ups(session, job_id: str, finalize: bool, purge: list[tuple[int, int]]) -> None:
    """After commit: the purge batches the learner phase released, or the finalize."""
    for batch_no, cursor in purge:
        publish_after_commit(session, "resets.purge", [job_id, batch_no, cursor])
    if finalize:
        publish_after_commit(session, "resets.finalize", [job_id])


def execute_batch(job_id: str, batch_no: int) -> reset_steps.BatchResult | None:
    """Claim, run and commit one batch; publish notifications/finalize after commit.

    On an error the attempt stays counted and the error is recorded; the caller
    retries (the task with backoff). Returns None when the batch is not runnable.
    """
    settings = get_settings()
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
            publish_follow_ups(session, job_id, result.job_complete or result.job_state == "cancelled",
                               result.purge)
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
    return result


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
        raise task.retry(countdown=reset_steps.retry_countdown(failed.attempts), exc=None) from None
    except DATABASE_UNAVAILABLE as exc:
        # The claim itself did not commit: no attempt was counted.
        raise retry_later(task, job_id, exc) from None


@project_task("resets.run_batch", bind=True, max_retries=None)
def run_batch(self, job_id: str, batch_no: int) -> None:
    _run_batch_with_retry(self, job_id, batch_no)


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
    settings = get_settings()
    started = time.perf_counter()
    try:
        with session_scope() as session:
            result = reset_steps.purge_step(session, job_id, int(batch_no), cursor, settings.purge_chunk_rows,
                                            settings.batch_lease_seconds)
            if result.status == "done" and result.job_complete:
                publish_after_commit(session, "resets.finalize", [job_id])
            elif result.status == "cancelled":
                publish_after_commit(session, "resets.finalize", [job_id])
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log_event("reset.purge.error", logging.WARNING, job_id=job_id, batch=batch_no, error=error)
        try:
            with session_scope() as session:
                dead, complete = reset_steps.fail_purge_step(session, job_id, int(batch_no), error,
                                                             settings.batch_max_attempts)
                if dead and complete:
                    publish_after_commit(session, "resets.finalize", [job_id])
        except DATABASE_UNAVAILABLE:
            dead = False  # not counted; the step is retried with the same cursor
        if dead:
            return
        raise self.retry(countdown=reset_steps.retry_countdown(self.request.retries + 1), exc=None) from None
    if result.status in ("progressed", "unpublished"):
        # The next step (or, for a step whose publish a crash lost, the current one) is
        # published after the commit and then recorded, so a redelivered older message
        # can tell whether the chain is still alive (reset_steps.purge_step).
        if send_now("resets.purge", [job_id, int(batch_no), result.cursor]):
            with session_scope() as session:
                reset_steps.mark_purge_published(session, job_id, int(batch_no), result.cursor)
    log_event("reset.purge.step", job_id=job_id, batch=batch_no, status=result.status, rows=result.deleted,
              duration_ms=round((time.perf_counter() - started) * 1000, 1))


def finalize_now(job_id: str) -> reset_steps.FinalizeResult:
    with session_scope() as session:
        return reset_steps.finalize_job(session, job_id)


@project_task("resets.finalize", bind=True, max_retries=None)
def finalize(self, job_id: str) -> None:
    try:
        finalize_now(job_id)
    except DATABASE_UNAVAILABLE as exc:
        raise retry_later(self, job_id, exc) from None
