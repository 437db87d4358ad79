"""Retention, worker side: the ``maintenance.retention`` task beat runs every minute (decision record 0012).

Its own beat entry rather than a part of ``maintenance.sweep``: a long backlog (the first run
after an upgrade, a year of rows) never makes the sweep's re-publishing wait. A run removes
chunks of :mod:`models.retention`, each its own short transaction, for at most
``TASK_SLICE_SECONDS``, and leaves the rest to the next tick: about a second of deletes a minute
keeps far ahead of what a day writes, and never holds the ``maintenance`` slot longer.
"""

from __future__ import annotations

import time

from models.db import session_scope
from models.times import utcnow
from models.logs import log_event
from models.retention import remove_chunk, start_sweep
from models.settings import get_settings
from tasks.base import project_task

TASK_NAME = "maintenance.retention"


def remove_for_a_slice(budget_seconds: float | None = None) -> dict:
    """Remove expired rows chunk by chunk until none is left or ``budget_seconds`` (default
    ``TASK_SLICE_SECONDS``) are spent; returns rows removed per table and whether more is left."""
    settings = get_settings()
    sweep = start_sweep(utcnow(), settings)
    deadline = time.monotonic() + (settings.task_slice_seconds if budget_seconds is None else budget_seconds)
    while time.monotonic() < deadline:
        with session_scope() as session:
            if not remove_chunk(session, sweep):
                break
    return sweep.report() | {"more": not sweep.done}


@project_task(TASK_NAME, autoretry_for=())  # beat runs it again at the next tick
def run_retention() -> None:
    report = remove_for_a_slice()
    if any(count for key, count in report.items() if key != "more"):
        log_event("retention.removed", **report)
