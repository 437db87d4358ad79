"""Celery entry points of the reset pipeline: ids in, one function call each.

- ``resets.start(job_id)``          queue ``resets``: start the queued job whose turn it is.
- ``resets.work()``                 queue ``reset_batches``: run the unit whose turn it is.
- ``resets.run_single(job_id, n)``  queue ``resets``: a one-learner job's batch, retried.
- ``resets.finalize(job_id)``       queue ``resets``: close a job (a cancel's clean-up, the sweep).

An unreachable database retries a task under the same message id with backoff
(:func:`tasks.base.project_task`); a retried ``resets.work`` first takes back the unit its id
claimed. The steps themselves are in the modules of this package (see its ``__init__``).
"""

from __future__ import annotations

from tasks.base import project_task
from tasks.resets.finalize import finalize_now
from tasks.resets.one_learner import retry_one_learner_batch
from tasks.resets.start import start_next_job
from tasks.resets.wakeups import LOCKED_UNIT_RETRY_SECONDS
from tasks.resets.work import UnitRun, run_next_unit


@project_task("resets.start")
def start(job_id: str) -> None:
    """Start the queued job whose turn it is (each confirm publishes one start, so each job gets one)."""
    start_next_job(job_id)


@project_task("resets.work", bind=True)
def work(self) -> None:
    """Run the unit whose turn it is, then hand the turn on with another wake-up."""
    if run_next_unit(owner=self.request.id) == UnitRun.LOCKED:
        raise self.retry(countdown=LOCKED_UNIT_RETRY_SECONDS, exc=None)


@project_task("resets.run_single", bind=True)
def run_single(self, job_id: str, batch_no: int) -> None:
    """A one-learner job's batch, retried after the unit backoff until it succeeds or is dead-lettered."""
    retry_in = retry_one_learner_batch(job_id, int(batch_no))
    if retry_in is not None:
        raise self.retry(countdown=retry_in, exc=None)


@project_task("resets.finalize")
def finalize(job_id: str) -> None:
    """Close the job if its batches have finished (safe to run any number of times)."""
    finalize_now(job_id)
