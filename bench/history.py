"""A year of history, measured: ``python -m bench --history [--history-scale F] [--runs N]``.

On the burst scenario's base (``bench/burst.py``: organizations A and B) the same measurements
run three times in one run: on **empty** history tables, on a copy with **a year of history**
(:mod:`bench.history_seed`), and on that copy after **one** ``progress-reset retention --apply``:

- one-learner resets on an idle system, one after another (confirm to succeeded): p95;
- 300-learner course resets on an idle system, one after another: p50;
- the campaign-day burst of ``bench/burst.py`` (compose topology): A's drain time;
- the first page of ``GET /v1/resets`` (50 jobs) for the busiest organization, A: median ms;
- the audit export of A for the last full calendar month, in-process, as ``audit export``
  runs it (every row read and rendered): median ms.

Ratios are history (or after retention) over empty, measured in turns in the same run (empty tables
are measured again next to the database after retention). The apply is timed, and
what it left is compared with the history it started from: every row of an unfinished job,
every outbox row still to be sent and every row younger than its window is still there, the
audit trail is whole, and it removed exactly what it reported. ``EXPLAIN (ANALYZE, BUFFERS)``
of the queries that run often is taken on each database (:mod:`bench.history_explain`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench import burst, common
from bench.history_explain import explain_all
from bench.history_seed import seed_history

SINGLES_PER_RUN = 30
LIST_REQUESTS = 20
EXPORTS = 3
HISTORY_DB = f"{common.PREFIX}_history"
PRUNED_DB = f"{common.PREFIX}_history_pruned"
# Rows of unfinished jobs and open outbox rows, made older than every window: retention must keep them.
LIVE_SQL = """
WITH org AS (SELECT id FROM organizations WHERE name = 'History tenant 3'),
ep AS (SELECT min(id) AS id FROM webhook_endpoints WHERE organization_id = (SELECT id FROM org)),
jobs AS (
    INSERT INTO reset_jobs (id, organization_id, course_id, scope, state, actor_id, reason, origin, params_hash,
        summary, created_at, confirmed_at, started_at, heartbeat_at, finished_at, learners_total, learners_done,
        batches_total, batches_done, batches_dead, cleared, watermarks, purge_total, purge_done)
    SELECT gen_random_uuid(), (SELECT id FROM org), 90000000 + n, 'course', s, 1, 'live', 'cli', 'live', '{}',
        now() - interval '400 days', now() - interval '400 days', now() - interval '400 days', now(),
        CASE WHEN s = 'succeeded' THEN now() - interval '400 days' END, 20, 10, 2, 1, 0, '{}', '{}', 0, 0
    FROM (VALUES (1, 'running'), (2, 'cancelling'), (3, 'succeeded')) v(n, s)
    RETURNING id, state, created_at
),
batches AS (
    INSERT INTO reset_batches (job_id, batch_no, kind, lo_user_id, hi_user_id, state, attempts, lease_expires_at,
        finished_at, learners_reset, cleared)
    SELECT id, b, 'learners', (b - 1) * 10, b * 10, CASE WHEN b = 1 THEN 'done' ELSE 'running' END, 1,
        CASE WHEN b = 2 THEN now() + interval '365 days' END, CASE WHEN b = 1 THEN created_at END, 10, '{}'
    FROM jobs CROSS JOIN generate_series(1, 2) b WHERE state <> 'succeeded'
),
notified AS (
    INSERT INTO notifications (user_id, course_id, reset_job_id, kind, status, attempts, next_attempt_at, sent_at,
        created_at)
    SELECT 90000000 + g, 1, id, 'course_assigned', CASE WHEN g <= 15 THEN 'sent' ELSE 'pending' END, 1,
        CASE WHEN g > 15 THEN now() + interval '365 days' END, CASE WHEN g <= 15 THEN created_at END, created_at
    FROM jobs CROSS JOIN generate_series(1, 20) g
),
events AS (
    INSERT INTO webhook_events (id, organization_id, type, job_id, payload, created_at)
    SELECT gen_random_uuid(), (SELECT id FROM org), 'reset.confirmed', id, '{}', created_at FROM jobs
    RETURNING id, job_id, created_at
)
INSERT INTO webhook_deliveries (event_id, endpoint_id, job_id, status, attempts, next_attempt_at, created_at,
    delivered_at)
SELECT e.id, (SELECT id FROM ep), e.job_id, CASE WHEN j.state = 'succeeded' THEN 'pending' ELSE 'delivered' END,
    1, now() + interval '365 days', e.created_at, CASE WHEN j.state <> 'succeeded' THEN e.created_at END
FROM events e JOIN jobs j ON j.id = e.job_id
"""


def _sql(url: str, statement: str, params: dict | None = None):
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(text(statement), params or {})
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def timed_reset(api: burst.Api, key: str, admin: int, course: int, learner: int | None = None) -> float:
    """One reset on an idle system: request, a pause, then confirm to ``succeeded`` in ms."""
    request = api.request(key, admin, course, learner)
    time.sleep(0.2)  # idle: nothing of the previous reset is still in flight
    started = burst.now()
    job = api.confirm(key, admin, request)
    return (burst.finished_at([job], timeout=120)[job] - started).total_seconds() * 1000


def last_full_month(now: datetime) -> tuple[datetime, datetime]:
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first - timedelta(days=1)).replace(day=1), first


def run_idle(base: str, info: dict, log_dir: Path) -> dict:
    """On one fresh system: five 300-learner resets, one-learner resets, the job list and the export (ms)."""
    from models.db import session_scope
    from producer.audit import export_events

    a, b = info["a"], info["b"]
    env, procs, api = burst.fresh_system(base, info, "compose", log_dir)
    try:
        small = [timed_reset(api, info["key_a"], a["admin_id"], course) for course in a["course_ids"][:5]]
        learners = burst.learners_with_progress(b["course_ids"][1])[:SINGLES_PER_RUN]
        singles = [timed_reset(api, info["key_b"], b["admin_id"], b["course_ids"][1], learner) for learner in learners]
        listing = []
        for _ in range(LIST_REQUESTS):
            started = time.perf_counter()
            page = api.client.get("/v1/resets", params={"limit": 50}, headers={"X-API-Key": info["key_a"]})
            page.raise_for_status()
            listing.append((time.perf_counter() - started) * 1000)
        month = last_full_month(datetime.now(timezone.utc))
        exports, exported = [], 0
        for _ in range(EXPORTS):
            started = time.perf_counter()
            with session_scope() as session:
                exported = sum(chunk.count("\n") for chunk in export_events(
                    session, a["organization_id"], date_from=month[0], date_to=month[1]))
            exports.append((time.perf_counter() - started) * 1000)
    finally:
        burst.stop_system(procs, api)
    return {"small_ms": small, "single_ms": singles, "list_ms": listing, "list_items": len(page.json()["items"]),
            "export_ms": exports, "export_events": exported}


def measure(bases: dict[str, str], info: dict, runs: int, log_dir: Path) -> dict[str, dict]:
    """The measurements on each of ``bases`` (label -> database), taken in turns run after run (in the
    other order every other run), so each pair is measured side by side, in the same minutes."""
    idle: dict[str, list] = {label: [] for label in bases}
    drains: dict[str, list] = {label: [] for label in bases}
    for run in range(runs):
        order = list(bases.items())[::-1 if run % 2 else 1]  # neither side is always measured first
        for label, base in order:
            idle[label].append(run_idle(base, info, log_dir))
        for label, base in order:
            drains[label].append(burst.run_burst(base, info, "compose", log_dir)["a_drain_s"])
    entries = {}
    for label in bases:
        runs_of = idle[label]
        singles = [ms for r in runs_of for ms in r["single_ms"]]
        entry = {
            "single_p50_ms": common.percentile(singles, 0.5), "single_p95_ms": common.percentile(singles, 0.95),
            "single_count": len(singles),
            "small_p50_ms": statistics.median(ms for r in runs_of for ms in r["small_ms"]),
            "burst_drain_s": statistics.median(drains[label]), "burst_drain_runs": drains[label],
            "list_ms": statistics.median(ms for r in runs_of for ms in r["list_ms"]),
            "list_items": runs_of[0]["list_items"],
            "export_ms": statistics.median(ms for r in runs_of for ms in r["export_ms"]),
            "export_events": runs_of[0]["export_events"], "runs": runs_of,
        }
        common.log(f"{label}: one-learner p95 {entry['single_p95_ms']:.0f} ms, 300-learner p50 "
                   f"{entry['small_p50_ms']:.0f} ms, burst drain {entry['burst_drain_s']:.2f}s, list "
                   f"{entry['list_ms']:.1f} ms, export {entry['export_ms']:.0f} ms ({entry['export_events']} events)")
        entries[label] = entry
    return entries


def live_fingerprint(url: str, before: dict[str, str]) -> dict:
    """What retention must never change: rows of unfinished jobs, open outbox rows, rows younger than their
    window (``before``: the apply's instants), the audit trail."""
    queries = {
        "unfinished_jobs": "SELECT count(*), md5(string_agg(id::text, ',' ORDER BY id)) FROM reset_jobs "
                           "WHERE state NOT IN ('succeeded', 'failed', 'cancelled', 'expired')",
        "their_notifications": "SELECT count(*), sum(n.id) FROM notifications n JOIN reset_jobs j ON j.id = "
                               "n.reset_job_id WHERE j.state NOT IN ('succeeded', 'failed', 'cancelled', 'expired')",
        "their_batches": "SELECT count(*), sum(b.batch_no) FROM reset_batches b JOIN reset_jobs j ON j.id = b.job_id "
                         "WHERE j.state NOT IN ('succeeded', 'failed', 'cancelled', 'expired')",
        "their_deliveries": "SELECT count(*), sum(d.id) FROM webhook_deliveries d JOIN reset_jobs j ON j.id = d.job_id "
                            "WHERE j.state NOT IN ('succeeded', 'failed', 'cancelled', 'expired')",
        "open_notifications": "SELECT count(*), sum(id) FROM notifications WHERE status IN ('pending', 'sending')",
        "open_deliveries": "SELECT count(*), sum(id) FROM webhook_deliveries WHERE status IN ('pending', 'sending')",
        "young_notifications": "SELECT count(*), sum(id) FROM notifications WHERE created_at >= :notifications",
        "young_deliveries": "SELECT count(*), sum(id) FROM webhook_deliveries WHERE created_at >= :webhook_deliveries",
        "young_events": "SELECT count(*) FROM webhook_events WHERE created_at >= :webhook_events",
        "young_batches": "SELECT count(*) FROM reset_batches WHERE finished_at >= :reset_batches",
        "young_jobs": "SELECT count(*), sum(hashtext(id::text)::bigint) FROM reset_jobs "
                      "WHERE created_at >= :reset_jobs",
        "audit_events": "SELECT count(*), sum(id), max(id) FROM audit_events",
    }
    return {name: [str(v) for v in _sql(url, sql, before)[0]] for name, sql in queries.items()}


def table_counts(url: str) -> dict[str, int]:
    from models.retention import TABLES

    return {t: _sql(url, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


def apply_retention(url: str, env: dict[str, str]) -> dict:
    """``progress-reset retention`` (dry run, then ``--apply``) on ``url``, timed; then VACUUM ANALYZE, timed."""
    cli = [str(Path(sys.executable).parent / "progress-reset"), "retention", "--json"]
    run_env = {**env, "DATABASE_URL": url}
    started = time.perf_counter()
    dry = json.loads(subprocess.run(cli, env=run_env, capture_output=True, text=True, check=True).stdout)
    dry_s = time.perf_counter() - started
    before_counts = table_counts(url)
    started = time.perf_counter()
    applied = json.loads(subprocess.run([*cli, "--apply"], env=run_env, capture_output=True, text=True,
                                        check=True).stdout)
    apply_s = time.perf_counter() - started
    after_counts = table_counts(url)
    started = time.perf_counter()
    _sql(url, "VACUUM ANALYZE")
    vacuum_s = time.perf_counter() - started
    removed = {t: v["rows"] for t, v in applied["tables"].items()}
    common.log(f"retention --apply: {apply_s:.1f}s ({removed}); dry run {dry_s:.1f}s; VACUUM ANALYZE {vacuum_s:.1f}s")
    return {"dry_run_s": dry_s, "apply_s": apply_s, "vacuum_s": vacuum_s, "dry_run": dry, "applied": applied,
            "removed": removed, "counts_before": before_counts, "counts_after": after_counts,
            "reported_equals_removed": all(before_counts[t] - after_counts[t] == removed[t] for t in removed)}


def run(runs: int, log_dir: Path, scale: float = 1.0) -> dict:
    from models.db import dispose_engine

    base, info = burst.seed_base()
    hist_url = common.copy_db(base, HISTORY_DB)
    seeded = seed_history(HISTORY_DB, info, scale)
    _sql(hist_url, LIVE_SQL)
    result: dict = {"scale": scale, "runs": runs, "seed": seeded, "plans": {}}
    result["plans"]["empty"] = explain_all(common.db_url(base), info, seeded)
    result["plans"]["history"] = explain_all(hist_url, info, seeded)
    result.update(measure({"empty": base, "history": HISTORY_DB}, info, runs, log_dir))
    pruned_url = common.copy_db(HISTORY_DB, PRUNED_DB)
    dispose_engine()
    env = common.configure(pruned_url)
    result["retention"] = apply_retention(pruned_url, env)
    cutoffs = {t: v["before"] for t, v in result["retention"]["applied"]["tables"].items()}
    kept_before, kept_after = live_fingerprint(hist_url, cutoffs), live_fingerprint(pruned_url, cutoffs)
    result["retention"]["untouched"] = {"history": kept_before, "after": kept_after, "equal": kept_before == kept_after}
    common.log(f"retention left every live and young row as it was: {kept_before == kept_after}")
    result["plans"]["pruned"] = explain_all(pruned_url, info, seeded)
    dispose_engine()
    common.drop_db(HISTORY_DB)
    result.update(measure({"empty_again": base, "pruned": PRUNED_DB}, info, runs, log_dir))
    common.drop_db(f"{common.PREFIX}_run")
    common.drop_db(PRUNED_DB)
    common.drop_db(base)
    for label, empty in (("history", result["empty"]), ("pruned", result["empty_again"])):
        entry = result[label]
        entry["single_p95_ratio"] = entry["single_p95_ms"] / empty["single_p95_ms"]
        entry["small_p50_ratio"] = entry["small_p50_ms"] / empty["small_p50_ms"]
        entry["burst_drain_ratio"] = entry["burst_drain_s"] / empty["burst_drain_s"]
    return result


def summary(result: dict) -> dict:
    """The RESULT keys: ratios against empty tables, the list and export in ms, and the same after retention."""
    h, p, r = result["history"], result["pruned"], result["retention"]
    return {
        "history_single_p95_ratio": round(h["single_p95_ratio"], 3),
        "history_small_p50_ratio": round(h["small_p50_ratio"], 3),
        "history_burst_drain_ratio": round(h["burst_drain_ratio"], 3),
        "history_list_ms": round(h["list_ms"], 1),
        "history_export_ms": round(h["export_ms"], 1),
        "history_seed_s": round(result["seed"]["timings"]["total_s"], 1),
        "retention_apply_s": round(r["apply_s"], 1),
        "retention_untouched": r["untouched"]["equal"] and r["reported_equals_removed"],
        "pruned_single_p95_ratio": round(p["single_p95_ratio"], 3),
        "pruned_small_p50_ratio": round(p["small_p50_ratio"], 3),
        "pruned_burst_drain_ratio": round(p["burst_drain_ratio"], 3),
        "pruned_list_ms": round(p["list_ms"], 1),
        "pruned_export_ms": round(p["export_ms"], 1),
    }


def print_table(result: dict) -> None:
    print(f"{'tables':>26} {'1-lrn p95 ms':>12} {'300 p50 ms':>10} {'drain s':>8} {'list ms':>8} {'export ms':>9}")
    for label, name in (("empty", "empty"), ("history", "a year of history"), ("empty_again", "empty (again)"),
                        ("pruned", "after retention")):
        e = result[label]
        print(f"{name:>26} {e['single_p95_ms']:>12.0f} {e['small_p50_ms']:>10.0f} {e['burst_drain_s']:>8.2f} "
              f"{e['list_ms']:>8.1f} {e['export_ms']:>9.0f}")
