"""``progress-reset demo``: the main job end to end on whatever backend is configured.

Embedded default (nothing set): SQLite + filesystem broker under ./data, real
worker processes. With DATABASE_URL / CELERY_BROKER_URL set: PostgreSQL + Redis.
"""

from __future__ import annotations

import json
import os
import time

from rich.console import Console
from rich.table import Table

from models import analytics, queues
from models.db import dispose_engine, session_scope
from models.migrate import upgrade
from models.seed import seed
from models.settings import get_settings
from producer import resets
from producer.watch import watch
from workers.processes import start_worker

NOTIFY_QUEUES = queues.NOTIFICATIONS
RESET_QUEUES = ",".join(q for q in queues.QUEUES if q != NOTIFY_QUEUES)


def run_demo(learners: int = 20_000, concurrency: int = 2, as_json: bool = False) -> int:
    settings = get_settings()
    console = Console(stderr=as_json)
    backend = "embedded SQLite + filesystem broker" if settings.embedded else "PostgreSQL + Redis"
    console.print(f"[bold]progress-reset demo[/] on {backend}")
    console.print(f"database: {settings.database_url.split('@')[-1]}")
    upgrade()
    dispose_engine()

    t0 = time.perf_counter()
    with session_scope() as session:
        seeded = seed(session, learners=learners, lessons=20, courses=2, completed_ratio=0.35)
    course_id, other_course = seeded.course_ids
    console.print(f"seeded organization {seeded.organization_id}: {seeded.learners:,} learners in 2 courses "
                  f"({time.perf_counter() - t0:.1f}s)")
    with session_scope() as session:
        before = analytics.read_analytics(session, course_id)
        other_before = analytics.read_analytics(session, other_course)

    env = {}
    if not settings.notify_console_path:
        env["NOTIFY_CONSOLE_PATH"] = str(settings.data_dir / "notifications.jsonl")
    if "notify_rate_per_second" not in settings.model_fields_set:  # NOTIFY_RATE_PER_SECOND not set
        # The console backend has no provider to protect: let the demo's notifications drain quickly.
        env["NOTIFY_RATE_PER_SECOND"] = "5000"
    # SQLite serialises writers, so one reset process does the most; notifications get their own.
    reset_concurrency = 1 if settings.embedded else concurrency
    workers = [
        start_worker(RESET_QUEUES, concurrency=reset_concurrency, name=f"demo-{os.getpid()}", env=env,
                     log_dir=settings.data_dir / "logs"),
        start_worker(NOTIFY_QUEUES, concurrency=1, name=f"demo-notify-{os.getpid()}", env=env,
                     log_dir=settings.data_dir / "logs"),
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        console.print(f"started workers: pid {workers[0].pid} ({reset_concurrency} processes) on {RESET_QUEUES}; "
                      f"pid {workers[1].pid} (1 process) on {NOTIFY_QUEUES}")
        with session_scope() as session:
            req = resets.request(session, seeded.admin_id, course_id, reason="Procedure changed: retrain everyone",
                                 origin="demo")
        s = req.summary
        console.print(f"request {req.request_id}: {s['learners']:,} learners, {s['completions']:,} completions, "
                      f"{s['certificates']:,} certificates will be cleared; {s['learners_to_notify']:,} notified")
        started = time.perf_counter()
        with session_scope() as session:
            job = resets.confirm(session, req.request_id, seeded.admin_id, req.token)
        console.print(f"confirmed: job {job.job_id} queued")
        final = watch(job.job_id, interval=0.3, console=console)
        elapsed = time.perf_counter() - started
        # Give the notifications queue a moment to drain for the summary.
        deadline = time.monotonic() + 30
        while final["notifications"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.5)
            final = _status(job.job_id)
    finally:
        for worker in workers:
            worker.stop()

    with session_scope() as session:
        after = analytics.read_analytics(session, course_id)
        exact = analytics.count_from_rows(session, course_id)
        other_after = analytics.read_analytics(session, other_course)
    summary = {
        "job_id": job.job_id,
        "state": final["state"],
        "learners_reset": final["learners_done"],
        "batches": final["batches_total"],
        "cleared": final["cleared"],
        "completion_rate_before": before.completion_rate,
        "completion_rate_after": after.completion_rate,
        "analytics_exact": after == exact,
        "other_course_untouched": other_before == other_after,
        "notifications": final["notifications"],
        "seconds": round(elapsed, 2),
        "learners_per_s": round(final["learners_done"] / elapsed, 1) if elapsed else None,
    }
    table = Table(title="reset summary", show_header=False)
    table.add_row("state", final["state"])
    table.add_row("learners reset", f"{final['learners_done']:,} in {final['batches_total']} batches")
    for name, rows in final["cleared"].items():
        table.add_row(f"cleared {name}", f"{rows:,}")
    table.add_row("completion rate", f"{before.completion_rate:.1f}% -> {after.completion_rate:.1f}%")
    table.add_row("analytics exact", str(summary["analytics_exact"]))
    table.add_row("other course untouched", str(summary["other_course_untouched"]))
    n = final["notifications"]
    table.add_row("notifications", f"{n['sent']:,} sent, {n['pending']:,} pending, {n['failed']:,} failed")
    table.add_row("time", f"{elapsed:.1f}s ({summary['learners_per_s']:,} learners/s)")
    console.print(table)
    if as_json:
        print(json.dumps(summary, default=str, sort_keys=True))
    return 0 if final["state"] == "succeeded" and summary["analytics_exact"] else 1


def _status(job_id: str) -> dict:
    with session_scope() as session:
        return resets.status(session, job_id)
