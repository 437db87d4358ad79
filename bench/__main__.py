"""The benchmark: a course-wide reset against the SQL floor, fairness, scale, memory, notifications.

    python -m bench [--sizes 10000,100000] [--runs 3] [--large] [--skip-fairness] [--burst | --skip-burst]
                    [--tracing off|on] [--outbound inline]
    python -m bench --history [--history-scale 1] [--runs 3]   (an even --runs measures each side second as often)

``--burst`` runs only the many-jobs scenario of :mod:`bench.burst` (a campaign-day burst of
one organization while another works, on two worker topologies, and small courses on an
idle system); the default run includes it after the course sizes. ``--history`` runs only
:mod:`bench.history`: a year of history against empty tables, and after one retention pass.

On PostgreSQL + Redis with real worker processes (2 for ``reset_batches``, 1
for ``resets``, 1 for ``notifications``; console notifications to a file).
For each course size N it seeds one base database (N learners x 20 lessons,
laid out by time), then for each run copies it twice (``CREATE DATABASE ...
TEMPLATE``, the same physical layout): one copy for the floor (one set-based
transaction, :mod:`bench.floor`), one for the system (request -> confirm ->
``succeeded`` through the producer and the workers). Medians of the runs are
quoted. Prints a table, writes ``bench/results/<date>.json`` and ends with one
``RESULT {json}`` line.

``--tracing on`` runs the workers with tracing on (OpenTelemetry, every span exported over
OTLP/HTTP to a sink on loopback, :mod:`bench.trace_sink`); ``--tracing off`` makes sure it is off.
Either writes ``bench/results/<date>-tracing-<off|on>.json``, so the two runs sit side by side.

``--outbound inline`` runs the workers with ``OUTBOUND_CONCURRENCY=0``: every call out inside the
task that claimed it, bounded by its deadline only (the alternative decision record 0009 measured
the courier against); writes ``bench/results/<date>-outbound-inline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from bench import common
from models.states import AssignmentStatus

RESULTS = Path(__file__).resolve().parent / "results"
# Test processes claim Redis DB numbers in this registry (DB 0); the benchmark claims one the same way.
CLAIM_KEY = "progress_reset:tests:redis_db:{n}"
# How long a run waits for the notifications to drain after the reset (the rate is measured over it).
DRAIN_SECONDS = float(os.environ.get("BENCH_DRAIN_SECONDS", "60"))
PREFIX = common.PREFIX
REDIS_BASE = common.REDIS_BASE
log, admin, drop_db, db_url, copy_db, configure = (common.log, common.admin, common.drop_db, common.db_url,
                                                   common.copy_db, common.configure)
percentile = common.percentile


def seed_base(n: int) -> tuple[str, dict]:
    from models.db import dispose_engine, session_scope
    from models.migrate import upgrade
    from models.seed import seed

    name = f"{PREFIX}_base_{n}"
    drop_db(name)
    admin(f'CREATE DATABASE "{name}"')
    url = db_url(name)
    upgrade(url)
    configure(url)
    started = time.perf_counter()
    with session_scope() as session:
        big = seed(session, learners=n, lessons=20, courses=1, random_seed=n)
    seed_seconds = time.perf_counter() - started
    with session_scope() as session:
        small = seed(session, learners=500, lessons=20, courses=1, completed_ratio=0.9, random_seed=1)
    dispose_engine()
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    info = {"big": big.as_json(), "small": small.as_json(), "seed_seconds": seed_seconds}
    log(f"seeded {n:,} learners in {seed_seconds:.1f}s")
    return name, info


class Workers:
    """The benchmark's worker processes, with peak RSS read from /proc (VmHWM) before they stop."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        from models import queues
        from workers.processes import start_worker

        self.procs = [
            start_worker(queues.RESET_BATCHES, 2, "bench-batches", env, log_dir),
            start_worker(queues.RESETS, 1, "bench-resets", env, log_dir),
            # Notifications are not latency-critical: on this shared 2-core host they run at a lower
            # CPU priority, as docs/operations.md recommends when they share a host with resets.
            start_worker(queues.NOTIFICATIONS, 1, "bench-notify", env, log_dir, niceness=10),
        ]
        for p in self.procs:
            p.wait_ready()

    def peak_rss_mb(self) -> dict[str, float]:
        peaks = {}
        for p in self.procs:
            for pid in [p.pid, *p.children()]:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except FileNotFoundError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[f"{p.name}:{pid}"] = int(line.split()[1]) / 1024
        return peaks

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def wait_done(job_id: str, timeout: float = 3600) -> dict:
    from models.db import session_scope
    from producer import resets

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            st = resets.status(session, job_id)
        if st["state"] in {"succeeded", "failed", "cancelled"}:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {st['state']} after {timeout}s")
        time.sleep(0.05)


def single_resets(info: dict, stop: threading.Event, latencies: list[float]) -> None:
    """One-learner resets on the small course, one after another, until ``stop``."""
    from sqlalchemy import select as sa_select

    from models.db import session_scope
    from models.schema import CourseAssignment
    from producer import resets

    small = info["small"]
    course = small["course_ids"][0]
    with session_scope() as session:
        learners = session.scalars(sa_select(CourseAssignment.user_id).where(
            CourseAssignment.course_id == course, CourseAssignment.status != AssignmentStatus.NOT_STARTED)).all()
    for learner in learners:
        if stop.is_set():
            return
        with session_scope() as session:
            req = resets.request(session, small["admin_id"], course, learner_id=learner, reason="fairness")
        started = time.perf_counter()
        with session_scope() as session:
            job = resets.confirm(session, req.request_id, small["admin_id"], req.token)
        st = wait_done(job.job_id, timeout=120)
        latencies.append((time.perf_counter() - started) * 1000)
        assert st["state"] == "succeeded", st


def warm_up(info: dict) -> None:
    """One one-learner reset before the clock starts: this process's broker connection and the
    workers' first tasks are warm, as in a running API server (a cold first publish adds ~0.1 s)."""
    from models.db import session_scope
    from models.schema import CourseAssignment
    from producer import resets

    small = info["small"]
    course = small["course_ids"][0]
    with session_scope() as session:
        learner = session.scalar(select(CourseAssignment.user_id).where(
            CourseAssignment.course_id == course, CourseAssignment.status != AssignmentStatus.NOT_STARTED)
            .order_by(CourseAssignment.user_id.desc()).limit(1))
        req = resets.request(session, small["admin_id"], course, learner_id=learner, reason="warm-up")
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, small["admin_id"], req.token)
    wait_done(job.job_id, timeout=60)


def run_system_once(base: str, info: dict, log_dir: Path, fairness: bool = False) -> dict:
    from models.db import dispose_engine, session_scope
    from models.schema import Notification, ResetJob
    from producer import resets

    url = copy_db(base, f"{PREFIX}_run")
    console = log_dir / "notifications.jsonl"
    console.unlink(missing_ok=True)
    env = configure(url, {"NOTIFY_CONSOLE_PATH": str(console)})
    import redis

    redis.Redis.from_url(common.REDIS_URL).flushdb()
    workers = Workers(env, log_dir)
    big = info["big"]
    try:
        warm_up(info)
        latencies: list[float] = []
        stop = threading.Event()
        started = time.perf_counter()
        with session_scope() as session:
            req = resets.request(session, big["admin_id"], big["course_ids"][0], reason="benchmark")
        with session_scope() as session:
            job = resets.confirm(session, req.request_id, big["admin_id"], req.token)
        thread = None
        if fairness:
            thread = threading.Thread(target=single_resets, args=(info, stop, latencies), daemon=True)
            thread.start()
        st = wait_done(job.job_id)
        seconds = time.perf_counter() - started
        stop.set()
        if thread:
            thread.join(60)
        # Let the notifications drain (for a bounded time) to measure their rate.
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            with session_scope() as session:
                n = resets.status(session, job.job_id)["notifications"]
            if not n["pending"]:
                break
            time.sleep(0.5)
        with session_scope() as session:
            job_key = uuid.UUID(job.job_id)
            finished = session.get(ResetJob, job_key).finished_at
            # The rate once the reset is over and the worker has the host to itself.
            first, last, sent = session.execute(select(
                func.min(Notification.sent_at), func.max(Notification.sent_at), func.count())
                .where(Notification.reset_job_id == job_key, Notification.status == "sent",
                       Notification.sent_at > finished)).one()
        rss = workers.peak_rss_mb()
        phases = phase_timeline(job.job_id)
    finally:
        workers.stop()
        dispose_engine()
    notify_rate = (sent - 1) / (last - first).total_seconds() if sent and first and last and last > first else None
    return {"seconds": seconds, "state": st["state"], "learners": st["learners_done"],
            "batches": st["batches_total"], "cleared": st["cleared"], "rss_mb": rss,
            "notifications_sent": sent, "notifications_per_s": notify_rate, "single_latencies_ms": latencies,
            "phases": phases}


def phase_timeline(job_id: str) -> dict:
    """Seconds from confirm to: start, end of the learner phase, end of the purge, finish."""
    from models.db import session_scope
    from models.schema import ResetBatch, ResetJob

    with session_scope() as session:
        job = session.get(ResetJob, uuid.UUID(job_id))
        t0 = job.confirmed_at
        ends = dict(session.execute(select(ResetBatch.kind, func.max(ResetBatch.finished_at))
                                    .where(ResetBatch.job_id == job.id).group_by(ResetBatch.kind)).all())
        return {"started": (job.started_at - t0).total_seconds(),
                "learners_done": (ends["learners"] - t0).total_seconds() if ends.get("learners") else None,
                "purge_done": (ends["purge"] - t0).total_seconds() if ends.get("purge") else None,
                "finished": (job.finished_at - t0).total_seconds()}


def claim_redis_db() -> str:
    """A Redis DB no running test process uses (claimed for this process in DB 0's registry)."""
    import redis

    registry = redis.Redis.from_url(f"{REDIS_BASE}/0")
    for n in range(15, 0, -1):
        if registry.set(CLAIM_KEY.format(n=n), str(os.getpid()), nx=True, ex=6 * 3600):
            return f"{REDIS_BASE}/{n}"
    raise SystemExit("no free Redis DB: every number 1-15 is claimed by a running test process")


def release_redis_db(url: str) -> None:
    import redis

    registry = redis.Redis.from_url(f"{REDIS_BASE}/0")
    key = CLAIM_KEY.format(n=url.rsplit("/", 1)[1])
    if registry.get(key) == str(os.getpid()).encode():
        registry.delete(key)


def main(argv: list[str] | None = None) -> int:
    claimed = not common.REDIS_URL
    if claimed:
        common.REDIS_URL = claim_redis_db()
    try:
        return run(argv)
    finally:
        if claimed:
            release_redis_db(common.REDIS_URL)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--large", action="store_true", help="also N = 1,000,000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-fairness", action="store_true")
    burst = parser.add_mutually_exclusive_group()
    burst.add_argument("--burst", action="store_true", help="only the many-jobs scenario (bench/burst.py)")
    burst.add_argument("--skip-burst", action="store_true")
    burst.add_argument("--history", action="store_true",
                       help="only a year of history against empty tables, and after retention (bench/history.py)")
    parser.add_argument("--history-scale", type=float, default=1.0,
                        help="with --history: the size of the history (1: a million finished jobs)")
    parser.add_argument("--tracing", choices=("off", "on"), help="run the workers with tracing off or on")
    parser.add_argument("--outbound", choices=("inline",),
                        help="calls out inside their tasks (OUTBOUND_CONCURRENCY=0), to compare with the courier")
    args = parser.parse_args(argv)
    if args.outbound == "inline":
        os.environ["OUTBOUND_CONCURRENCY"] = "0"
    sink = None
    if args.tracing == "on":
        from bench.trace_sink import TraceSink

        sink = TraceSink()
        os.environ.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=sink.endpoint)
    elif args.tracing == "off":
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
    sizes = [] if args.burst else [int(s) for s in args.sizes.split(",") if s]
    if args.large and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    log_dir = Path(os.environ.get("PROGRESS_RESET_DATA_DIR", "data")).resolve() / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    from models.logs import configure_logging

    configure_logging(level=40)
    if args.history:
        return run_history(args.runs, log_dir, args.history_scale)
    results: dict = {"started_at": datetime.now(timezone.utc).isoformat(), "runs": args.runs, "sizes": {}}
    for n in sizes:
        base, info = seed_base(n)
        floors, systems = [], []
        for run in range(args.runs):
            floors.append(common.time_floor(base, info["big"]["course_ids"][:1]))
            log(f"N={n:,} run {run + 1}: floor {floors[-1]:.2f}s")
            systems.append(run_system_once(base, info, log_dir))
            log(f"N={n:,} run {run + 1}: system {systems[-1]['seconds']:.2f}s ({systems[-1]['state']}) "
                f"phases {systems[-1]['phases']}")
        entry = {
            "learners_reset": systems[0]["learners"],
            "seed_seconds": info["seed_seconds"],
            "floor_s": statistics.median(floors),
            "system_s": statistics.median(s["seconds"] for s in systems),
            "floor_runs": floors,
            "system_runs": [s["seconds"] for s in systems],
            "batches": systems[0]["batches"],
            "cleared": systems[0]["cleared"],
            "states": [s["state"] for s in systems],
            "worker_rss_mb_max": max(max(s["rss_mb"].values()) for s in systems),
            "notifications_per_s": statistics.median(
                [s["notifications_per_s"] for s in systems if s["notifications_per_s"]] or [0]),
        }
        entry["ratio"] = entry["system_s"] / entry["floor_s"]
        entry["per_learner_us"] = entry["system_s"] / n * 1e6
        if n == 100_000 and not args.skip_fairness:
            fair = run_system_once(base, info, log_dir, fairness=True)
            entry["single_latencies_ms"] = fair["single_latencies_ms"]
            entry["single_p50_ms"] = percentile(fair["single_latencies_ms"], 0.5)
            entry["single_p95_ms"] = percentile(fair["single_latencies_ms"], 0.95)
            log(f"fairness: {len(fair['single_latencies_ms'])} one-learner resets, p50 {entry['single_p50_ms']:.0f} ms,"
                f" p95 {entry['single_p95_ms']:.0f} ms")
        results["sizes"][str(n)] = entry
        drop_db(f"{PREFIX}_run")
        drop_db(base)

    print(f"{'N':>10} {'floor s':>9} {'system s':>9} {'ratio':>6} {'us/learner':>11} {'batches':>8} "
          f"{'rss MB':>7} {'notif/s':>8} {'seed s':>7}")
    for n, e in results["sizes"].items():
        print(f"{int(n):>10,} {e['floor_s']:>9.2f} {e['system_s']:>9.2f} {e['ratio']:>6.2f} "
              f"{e['per_learner_us']:>11.1f} {e['batches']:>8} {e['worker_rss_mb_max']:>7.0f} "
              f"{e['notifications_per_s']:>8.0f} {e['seed_seconds']:>7.1f}")
    if not args.skip_burst:
        from bench import burst

        results["burst"] = burst.run(args.runs, log_dir)
    s100 = results["sizes"].get("100000", {})
    s10 = results["sizes"].get("10000", {})
    summary = {
        "ratio_10k": round(s10["ratio"], 3) if s10 else None,
        "ratio_100k": round(s100["ratio"], 3) if s100 else None,
        "per_learner_us": {n: round(e["per_learner_us"], 1) for n, e in results["sizes"].items()},
        "single_p95_ms": round(s100["single_p95_ms"], 1) if s100.get("single_p95_ms") is not None else None,
        "worker_rss_mb_max": round(max([e["worker_rss_mb_max"] for e in results["sizes"].values()]
                                       + [results.get("burst", {}).get(t, {}).get("worker_rss_mb_max", 0)
                                          for t in ("compose", "single")]), 1),
        "notifications_per_s": round(max([e["notifications_per_s"] for e in results["sizes"].values()] or [0]), 1),
    }
    if "burst" in results:
        b = results["burst"]
        for key in ("burst_drain_ratio", "burst_other_org_slowdown", "single_p95_ms", "small_300_p50_ms",
                    "slow_receiver_other_org_p95_ms", "slow_receiver_other_org_max_ms", "notify_rate_achieved",
                    "duplicate_sends"):
            name = "burst_single_p95_ms" if key == "single_p95_ms" else key
            summary[name] = {t: round(b[t][key], 3) for t in ("compose", "single")}
        print(f"{'topology':>9} {'drain s':>8} {'floor s':>8} {'ratio':>6} {'B burst s':>9} {'B alone s':>9} "
              f"{'slowdown':>8} {'1-lrn p50':>9} {'1-lrn p95':>9} {'300 p50 ms':>10}")
        for t in ("compose", "single"):
            e = b[t]
            print(f"{t:>9} {e['a_drain_s']:>8.2f} {b['burst_floor_s']:>8.2f} {e['burst_drain_ratio']:>6.2f} "
                  f"{e['b_during_s']:>9.2f} {e['b_alone_s']:>9.2f} {e['burst_other_org_slowdown']:>8.2f} "
                  f"{e['single_p50_ms']:>9.0f} {e['single_p95_ms']:>9.0f} {e['small_300_p50_ms']:>10.0f}")
    if args.tracing:
        summary["tracing"] = args.tracing
        results["tracing"] = {"state": args.tracing, **(sink.stop() if sink else {})}
    if args.outbound:
        summary["outbound"] = results["outbound"] = args.outbound
    suffix = (f"-tracing-{args.tracing}" if args.tracing else "") + (f"-outbound-{args.outbound}" if args.outbound else "")
    return write_results(results, summary, suffix)


def write_results(results: dict, summary: dict, suffix: str = "") -> int:
    """``bench/results/<date><suffix>.json`` with the summary in it, and the ``RESULT {json}`` line."""
    results["summary"] = summary
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now().strftime('%Y-%m-%d')}{suffix}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    log(f"figures written to {out}")
    print("RESULT " + json.dumps(summary))
    return 0


def run_history(runs: int, log_dir: Path, scale: float) -> int:
    from bench import history

    result = history.run(runs, log_dir, scale)
    history.print_table(result)
    return write_results(result, history.summary(result), "-history" + ("" if scale == 1 else f"-{scale:g}"))


if __name__ == "__main__":
    sys.exit(main())
