"""The reset pipeline's plain functions: plan, take turns, reset a batch, purge, finalize.

Each takes a ``Session`` and never commits or touches Celery; the thin tasks in
:mod:`tasks.resets` own the transactions and publish follow-ups after commit.
Every function is safe to run twice: idempotency lives in the database.

- A batch is a row ``(job_id, batch_no)``: a keyset range of learner ids, or one
  component's pre-job rows to purge.
- Each learner's assignment records the last reset job applied to it, so a
  redelivered or re-planned batch skips learners it already reset.
- A step's work, its batch row's new state and the job's counters commit together.

Where things live:

- :mod:`~tasks.reset_steps.planning`: ``start_job`` claims a queued job and writes all its
  batch rows (``plan_batches``; ``plan_purge`` for the jobs that ``uses_deferred_purge``).
- :mod:`~tasks.reset_steps.turns`: fair turns between organizations and jobs (decision record
  0005): ``next_queued_job``, ``claim_next_unit``, ``runnable_units``, and the backoff of a
  failed unit (``unit_backoff_seconds``, ``defer_unit``).
- :mod:`~tasks.reset_steps.batch`: a learner batch: ``claim_batch`` (attempts, dead-lettering),
  ``run_batch`` (one statement on PostgreSQL, statement by statement on SQLite),
  ``record_batch_error``, and the job's counters that release the purge.
- :mod:`~tasks.reset_steps.purge`: the deferred purge in id order (decision record 0002):
  ``purge_step``, ``fail_purge_step``, and ``purge_reset_learners`` for a cancelled job.
- :mod:`~tasks.reset_steps.finalize`: ``finalize_job``: exact analytics, totals, final state and
  audit, including the clean-up of a cancelled job.
- :mod:`~tasks.reset_steps.rows`: the tables, ``job_uuid``, the batch row lock, step outcomes.

Which rows a batch still owes (learners not reset, rows still to purge) are predicates of
:mod:`models.batches`, shared with the operators' dead-batches report.
"""

from __future__ import annotations

from tasks.reset_steps.batch import BatchResult, ClaimResult, claim_batch, record_batch_error, release_purge, run_batch
from tasks.reset_steps.finalize import FinalizeResult, finalize_job
from tasks.reset_steps.planning import StartResult, plan_batches, plan_purge, start_job, uses_deferred_purge
from tasks.reset_steps.purge import PurgeFailure, PurgeResult, fail_purge_step, purge_reset_learners, purge_step
from tasks.reset_steps.rows import Outcome, job_uuid
from tasks.reset_steps.turns import (
    UnitClaim,
    claim_next_unit,
    defer_unit,
    next_queued_job,
    runnable_units,
    take_turn,
    unit_backoff_seconds,
)

__all__ = [
    "BatchResult", "ClaimResult", "FinalizeResult", "Outcome", "PurgeFailure", "PurgeResult", "StartResult",
    "UnitClaim", "claim_batch", "claim_next_unit", "defer_unit", "fail_purge_step", "finalize_job", "job_uuid",
    "next_queued_job", "plan_batches", "plan_purge", "purge_reset_learners", "purge_step", "record_batch_error",
    "release_purge", "run_batch", "runnable_units", "start_job", "take_turn", "unit_backoff_seconds",
    "uses_deferred_purge",
]
