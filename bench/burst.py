"""Many jobs at once: a campaign-day burst from one organization while another works.

    python -m bench --burst            (this scenario only; the default run includes it)

On a seeded base (organization A: 60 courses x 300 learners; organization B: 3,000 learners
in two courses; 20 lessons each, rows laid out by time), for each worker topology:

- **burst**: A requests 60 course-wide resets through the HTTP API, then confirms them all at
  once (8 client threads); right after, B confirms a course-wide reset of its 3,000-learner
  course, and a client resets single learners of B's other course one after another until the
  burst is over. Reported: A's drain time (first confirm to last job finished) against the floor
  for the same 60 resets (one SQL transaction each, one after another, on a copy of the same
  data), B's course time during the burst against the same reset on an idle system, and the
  one-learner latencies (confirm to succeeded) p50 / p95;
  Notifications go out at the default ``NOTIFY_RATE_PER_SECOND`` (50/s, the console backend
  limited like a real provider); reported: the rate achieved over ``NOTIFY_WINDOW_SECONDS`` after
  the burst against the configured one, and how many notifications were written twice;
- **small**: on an idle system, five 300-learner course resets one after another, confirm to
  succeeded, p50 (against the floor of one such reset);
- **slow receivers** (:mod:`bench.outside`): B's one-learner resets while A's webhook receivers
  trickle.

Topologies: ``compose`` (one worker per queue: ``resets -c 1``, ``reset_batches -c 2``,
``notifications -c 1`` at lower CPU priority, ``webhooks -c 2``, as docker-compose.yml runs them)
and ``single`` (one worker on every queue ``-c 2``, as README "Trying it by hand" runs it).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.pool import NullPool

from bench import common
from models import queues
from models.states import AssignmentStatus

A_COURSES = 60
A_LEARNERS = 300
B_LEARNERS = 3000
SMALL_RUNS = 5
# Notifications sent over this window after the burst give the rate achieved.
NOTIFY_WINDOW_SECONDS = 20.0
TOPOLOGIES = {
    "compose": [(queues.RESETS, 1, 0), (queues.RESET_BATCHES, 2, 0), (queues.NOTIFICATIONS, 1, 10),
                (queues.WEBHOOKS, 2, 0)],
    "single": [(",".join(queues.QUEUES), 2, 0)],
}


def default_rate() -> float:
    from models.settings import Settings

    return Settings.model_fields["notify_rate_per_second"].default


def seed_base() -> tuple[str, dict]:
    from models.db import dispose_engine, session_scope
    from models.migrate import upgrade
    from models.seed import seed
    from producer import apikeys

    name = f"{common.PREFIX}_burst_base"
    common.drop_db(name)
    common.admin(f'CREATE DATABASE "{name}"')
    url = common.db_url(name)
    upgrade(url)
    common.configure(url)
    with session_scope() as session:
        a = seed(session, learners=A_LEARNERS, lessons=20, courses=A_COURSES, random_seed=301)
        b = seed(session, learners=B_LEARNERS, lessons=20, courses=2, random_seed=302)
        key_a = apikeys.create_api_key(session, a.organization_id, "bench-a").key
        key_b = apikeys.create_api_key(session, b.organization_id, "bench-b").key
    dispose_engine()
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    common.log(f"burst base seeded: A {A_COURSES} x {A_LEARNERS}, B {B_LEARNERS} x 2")
    return name, {"a": a.as_json(), "b": b.as_json(), "key_a": key_a, "key_b": key_b}


class Api:
    """``progress-reset serve`` on a free loopback port, with the run's environment."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / "bench-api.log", "w")
        cli = Path(sys.executable).parent / "progress-reset"
        self.process = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                        env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        self.client = httpx.Client(base_url=self.base, timeout=30.0,
                                   limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"API server did not start; see {self.log.name}")
            time.sleep(0.1)

    def request(self, key: str, actor: int, course: int, learner: int | None = None) -> dict:
        body = {"actor_id": actor, "course_id": course, "reason": "benchmark"}
        if learner is not None:
            body["learner_id"] = learner
        r = self.client.post("/v1/resets", json=body, headers={"X-API-Key": key})
        r.raise_for_status()
        return r.json()

    def confirm(self, key: str, actor: int, request: dict) -> str:
        r = self.client.post(f"/v1/resets/{request['request_id']}/confirm",
                             json={"actor_id": actor, "token": request["token"]}, headers={"X-API-Key": key})
        r.raise_for_status()
        return r.json()["job_id"]

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def finished_at(job_ids: list[str], timeout: float = 600) -> dict[str, datetime]:
    """Wait until every job is finished; their ``finished_at`` (all must have succeeded)."""
    from models.db import session_scope
    from models.schema import ResetJob

    keys = [uuid.UUID(j) for j in job_ids]
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            rows = session.execute(select(ResetJob.id, ResetJob.state, ResetJob.finished_at)
                                   .where(ResetJob.id.in_(keys))).all()
        if all(state in ("succeeded", "failed", "cancelled") for _, state, _ in rows) and len(rows) == len(keys):
            bad = [(str(i), s) for i, s, _ in rows if s != "succeeded"]
            if bad:
                raise RuntimeError(f"jobs did not succeed: {bad[:5]}")
            return {str(i): at for i, _, at in rows}
        if time.monotonic() > deadline:
            raise RuntimeError("jobs still running after the timeout")
        time.sleep(0.01)


def now() -> datetime:
    return datetime.now(timezone.utc)


def learners_with_progress(course: int) -> list[int]:
    from models.db import session_scope
    from models.schema import CourseAssignment

    with session_scope() as session:
        return list(session.scalars(select(CourseAssignment.user_id).where(
            CourseAssignment.course_id == course, CourseAssignment.status != AssignmentStatus.NOT_STARTED)
            .order_by(CourseAssignment.user_id)))


def single_stream(api: Api, info: dict, stop: threading.Event, latencies: list[float]) -> None:
    b = info["b"]
    course = b["course_ids"][1]
    for learner in learners_with_progress(course):
        if stop.is_set():
            return
        req = api.request(info["key_b"], b["admin_id"], course, learner)
        t0 = now()
        job = api.confirm(info["key_b"], b["admin_id"], req)
        done = finished_at([job], timeout=120)[job]
        latencies.append((done - t0).total_seconds() * 1000)


def start_topology(topology: str, env: dict[str, str], log_dir: Path) -> list:
    from workers.processes import start_worker

    procs = [start_worker(queues, c, f"bench-{topology}-{i}", env, log_dir, niceness=nice)
             for i, (queues, c, nice) in enumerate(TOPOLOGIES[topology])]
    for p in procs:
        p.wait_ready()
    return procs


def peak_rss_mb(procs) -> float:
    peak = 0.0
    for p in procs:
        for pid in [p.pid, *p.children()]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except FileNotFoundError:
                continue
    return peak


def warm_up(api: Api, info: dict) -> None:
    """One one-learner reset before the clock starts: the API server's broker connection and the
    workers' first tasks are warm, as in a running installation."""
    b = info["b"]
    course = b["course_ids"][0]
    learner = learners_with_progress(course)[-1]
    job = api.confirm(info["key_b"], b["admin_id"], api.request(info["key_b"], b["admin_id"], course, learner))
    finished_at([job], timeout=60)


def fresh_system(base: str, info: dict, topology: str, log_dir: Path, extra: dict[str, str] | None = None):
    import redis

    url = common.copy_db(base, f"{common.PREFIX}_run")
    console = log_dir / "notifications.jsonl"
    console.unlink(missing_ok=True)
    env = common.configure(url, {"NOTIFY_CONSOLE_PATH": str(console), "NOTIFY_RATE_PER_SECOND": str(default_rate()),
                                 **(extra or {})})
    redis.Redis.from_url(common.REDIS_URL).flushdb()
    procs = start_topology(topology, env, log_dir)
    api = Api(env, log_dir)
    warm_up(api, info)
    return env, procs, api


def stop_system(procs, api: Api) -> None:
    from models.db import dispose_engine

    api.stop()
    for p in procs:
        p.stop()
    dispose_engine()


def run_burst(base: str, info: dict, topology: str, log_dir: Path) -> dict:
    a, b = info["a"], info["b"]
    env, procs, api = fresh_system(base, info, topology, log_dir)
    try:
        a_requests = [api.request(info["key_a"], a["admin_id"], c) for c in a["course_ids"]]
        b_request = api.request(info["key_b"], b["admin_id"], b["course_ids"][0])
        latencies: list[float] = []
        stop = threading.Event()
        t0 = now()
        with ThreadPoolExecutor(8) as pool:
            a_jobs = list(pool.map(lambda r: api.confirm(info["key_a"], a["admin_id"], r), a_requests))
        b_t0 = now()
        b_job = api.confirm(info["key_b"], b["admin_id"], b_request)
        singles = threading.Thread(target=single_stream, args=(api, info, stop, latencies), daemon=True)
        singles.start()
        a_done = finished_at(a_jobs)
        b_done = finished_at([b_job])[b_job]
        stop.set()
        singles.join(120)
        window_start = max(max(a_done.values()), b_done)
        time.sleep(max(0.0, (window_start - now()).total_seconds()) + NOTIFY_WINDOW_SECONDS)
        sent = sent_between(window_start, NOTIFY_WINDOW_SECONDS)
        rss = peak_rss_mb(procs)
    finally:
        stop_system(procs, api)
    return {"a_drain_s": (max(a_done.values()) - t0).total_seconds(), "b_s": (b_done - b_t0).total_seconds(),
            "single_ms": latencies, "rss_mb": rss, "notify_rate": sent / NOTIFY_WINDOW_SECONDS,
            "duplicate_sends": duplicate_lines(log_dir / "notifications.jsonl")}


def sent_between(start: datetime, seconds: float) -> int:
    """Notifications marked sent in ``[start, start + seconds)``."""
    from datetime import timedelta

    from sqlalchemy import func

    from models.db import session_scope
    from models.schema import Notification

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Notification).where(
            Notification.sent_at >= start, Notification.sent_at < start + timedelta(seconds=seconds))) or 0)


def duplicate_lines(console: Path) -> int:
    """Notifications the console backend wrote more than once (by idempotency key)."""
    import json

    keys = [json.loads(line)["idempotency_key"] for line in console.read_text().splitlines() if line]
    return len(keys) - len(set(keys))


def run_b_alone(base: str, info: dict, topology: str, log_dir: Path) -> float:
    b = info["b"]
    env, procs, api = fresh_system(base, info, topology, log_dir)
    try:
        req = api.request(info["key_b"], b["admin_id"], b["course_ids"][0])
        t0 = now()
        job = api.confirm(info["key_b"], b["admin_id"], req)
        return (finished_at([job])[job] - t0).total_seconds()
    finally:
        stop_system(procs, api)


def run_small(base: str, info: dict, topology: str, log_dir: Path) -> list[float]:
    """Five 300-learner course resets on an idle system, one after another: confirm to succeeded (ms)."""
    a = info["a"]
    env, procs, api = fresh_system(base, info, topology, log_dir)
    try:
        times = []
        for course in a["course_ids"][:SMALL_RUNS]:
            req = api.request(info["key_a"], a["admin_id"], course)
            time.sleep(0.2)  # idle: nothing of the previous reset is still in flight
            t0 = now()
            job = api.confirm(info["key_a"], a["admin_id"], req)
            times.append((finished_at([job])[job] - t0).total_seconds() * 1000)
        return times
    finally:
        stop_system(procs, api)


def run(runs: int, log_dir: Path) -> dict:
    base, info = seed_base()
    a_courses = info["a"]["course_ids"]
    result: dict = {"a_courses": A_COURSES, "a_learners": A_LEARNERS, "b_learners": B_LEARNERS}
    floors = [common.time_floor(base, a_courses) for _ in range(runs)]
    small_floors = [common.time_floor(base, a_courses[:1]) for _ in range(runs)]
    result["burst_floor_s"] = statistics.median(floors)
    result["small_300_floor_ms"] = statistics.median(small_floors) * 1000
    common.log(f"burst floor {result['burst_floor_s']:.2f}s (60 resets, one transaction each); "
               f"one 300-learner reset {result['small_300_floor_ms']:.0f} ms")
    from bench.outside import run_slow_receivers

    rate = default_rate()
    result["notify_rate_configured"] = rate
    for topology in TOPOLOGIES:
        bursts = [run_burst(base, info, topology, log_dir) for _ in range(runs)]
        alone = [run_b_alone(base, info, topology, log_dir) for _ in range(runs)]
        small = [t for _ in range(runs) for t in run_small(base, info, topology, log_dir)]
        slow = [run_slow_receivers(base, info, topology, log_dir) for _ in range(runs)]
        singles = [ms for r in bursts for ms in r["single_ms"]]
        slow_singles = [ms for r in slow for ms in r["single_ms"]]
        entry = {
            "a_drain_s": statistics.median(r["a_drain_s"] for r in bursts),
            "a_drain_runs": [r["a_drain_s"] for r in bursts],
            "b_during_s": statistics.median(r["b_s"] for r in bursts),
            "b_during_runs": [r["b_s"] for r in bursts],
            "b_alone_s": statistics.median(alone),
            "b_alone_runs": alone,
            "single_count": len(singles),
            "single_p50_ms": common.percentile(singles, 0.5),
            "single_p95_ms": common.percentile(singles, 0.95),
            "small_300_ms": small,
            "small_300_p50_ms": statistics.median(small),
            "worker_rss_mb_max": max(r["rss_mb"] for r in bursts),
            "notify_rate_runs": [r["notify_rate"] for r in bursts],
            "notify_rate_achieved": statistics.median(r["notify_rate"] for r in bursts) / rate,
            "duplicate_sends": sum(r["duplicate_sends"] for r in bursts),
            "slow_receiver_runs": slow,
            "slow_receiver_other_org_p95_ms": common.percentile(slow_singles, 0.95),
            "slow_receiver_other_org_max_ms": max(slow_singles),
        }
        entry["burst_drain_ratio"] = entry["a_drain_s"] / result["burst_floor_s"]
        entry["burst_other_org_slowdown"] = entry["b_during_s"] / entry["b_alone_s"]
        result[topology] = entry
        common.log(f"{topology}: drain {entry['a_drain_s']:.2f}s ({entry['burst_drain_ratio']:.2f}x floor), "
                   f"B {entry['b_during_s']:.2f}s vs {entry['b_alone_s']:.2f}s alone "
                   f"({entry['burst_other_org_slowdown']:.2f}x), one-learner p50 {entry['single_p50_ms']:.0f} ms "
                   f"p95 {entry['single_p95_ms']:.0f} ms ({len(singles)}), 300-learner p50 "
                   f"{entry['small_300_p50_ms']:.0f} ms; notifications at {entry['notify_rate_achieved']:.2f}x the "
                   f"rate, {entry['duplicate_sends']} sent twice; with trickling receivers one-learner p95 "
                   f"{entry['slow_receiver_other_org_p95_ms']:.0f} ms, max {entry['slow_receiver_other_org_max_ms']:.0f} ms")
    common.drop_db(f"{common.PREFIX}_run")
    common.drop_db(base)
    return result
