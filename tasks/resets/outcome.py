"""What one step of a unit did (``BatchResult.status``, ``PurgeResult.status``); never stored."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    DONE = "done"
    PROGRESSED = "progressed"  # a purge chunk: more rows of the batch remain
    SKIPPED = "skipped"  # a duplicate, or a batch no longer runnable
    CANCELLED = "cancelled"  # the job is being cancelled: the batch was marked cancelled
    FAILED = "failed"  # the step raised (the runner counts and defers it)
