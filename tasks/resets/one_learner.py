"""A one-learner job: its one batch runs inline in ``resets.start``, on the ``resets`` queue, so it
never waits behind a course-wide fan-out; a batch that failed is retried by ``resets.run_single``.

Same functions and transactions as a course-wide job's batches, without the extra hop through
the broker.
"""

from __future__ import annotations

from models.messaging import send_now
from models.tracing import job_span
from tasks.base import DATABASE_UNAVAILABLE
from tasks.resets.failures import BatchFailed, unit_backoff_seconds
from tasks.resets.finalize import finalize_now, finalize_or_publish
from tasks.resets.learner_batch import run_learner_batch
from tasks.resets.work import UNIT_SPAN

RETRY_TASK = "resets.run_single"


def run_one_learner_job(job_id: str, batch_nos: list[int]) -> None:
    """Run the job's batch (it has one) and finalize it. A failure is handed to ``resets.run_single``
    with the unit backoff: the job is running now, so a retried start would skip it."""
    for batch_no in batch_nos:
        try:
            run_learner_batch(job_id, batch_no)
        except (BatchFailed, *DATABASE_UNAVAILABLE) as failed:
            send_now(RETRY_TASK, [job_id, batch_no],
                     countdown=unit_backoff_seconds(getattr(failed, "attempts", 1)))
            return
    finalize_or_publish(job_id)


def retry_one_learner_batch(job_id: str, batch_no: int) -> float | None:
    """Run the batch again, then finalize; returns the backoff in seconds when it failed once more.

    A retry after the batch committed finds it done and only finalizes. The batch row counts the
    attempts, so one that keeps failing is dead-lettered and the job then ends ``failed``.
    The retry runs in a span of the job's trace (models/tracing.py).
    """
    with job_span(UNIT_SPAN, job_id=job_id, batch=batch_no):
        try:
            run_learner_batch(job_id, batch_no)
        except BatchFailed as failed:
            return unit_backoff_seconds(failed.attempts)
        finalize_now(job_id)
    return None
