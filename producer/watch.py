"""Watching a job: the live progress bar of ``status --watch`` and of the demo (rich)."""

from __future__ import annotations

import time

from models.states import JobState


def read_status(job_id: str) -> dict:
    """The job's status in its own short transaction."""
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        return resets.status(session, job_id)


TERMINAL_STATES = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}


def watch(job_id: str, interval: float = 0.5, console=None) -> dict:
    """Draw a live progress bar (learners done/total, rate, ETA) until the job ends; return the last status."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    current = read_status(job_id)
    with Progress(
        TextColumn("[bold]{task.fields[state]:>9}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("learners"), TextColumn("{task.fields[rate]:>8} /s"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[phase]}"), console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("reset", total=max(current["learners_total"], 1), state=current["state"], rate="-",
                                phase="")
        started = time.monotonic()
        first_done = current["learners_done"]
        while True:
            elapsed = time.monotonic() - started
            rate = (current["learners_done"] - first_done) / elapsed if elapsed > 0 else 0.0
            progress.update(bar, total=max(current["learners_total"], current["learners_done"], 1),
                            completed=current["learners_done"], state=current["state"], rate=f"{rate:,.0f}",
                            phase=_phase(current))
            if current["state"] in TERMINAL_STATES:
                break
            time.sleep(interval)
            current = read_status(job_id)
    return current


def _phase(st: dict) -> str:
    """What the job is doing besides counting learners: the purge of older rows, once it runs."""
    total = st.get("purge_batches_total") or 0
    if st["state"] != JobState.RUNNING or not total:
        return ""
    done = st.get("purge_batches_done") or 0
    if st["batches_done"] - done < st.get("learner_batches_total", 0):
        return "resetting learners"
    return f"clearing older rows: {done}/{total} parts"
