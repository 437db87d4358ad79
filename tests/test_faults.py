"""Fault tolerance (issue 7): kill, restart, duplicate, poison, with real PostgreSQL, workers and brokers.

Every scenario runs a course-wide reset through real ``celery worker`` processes
(one for ``resets,reset_batches``, one for ``notifications,maintenance``, as the
compose file splits them), injects a fault while batches are in flight, and then
checks the pass criterion against the database (:func:`fault_support.assert_outcome`):
the job ends ``succeeded`` (``failed`` naming the batch for the poison), every
targeted learner's attempt went up exactly once, nothing of another course or
learner changed, analytics equal a recomputation, one notification row per
notifiable learner and one delivery of each. Recovery time (fault to the job's
``finished_at``) is measured, bounded, and printed at the end of the module.

Every scenario runs twice, once per broker (issue 20): on a Redis server of the test's own,
and on RabbitMQ with quorum queues, in a virtual host of its own on the shared server or, for
the scenarios that stop, kill or wipe the broker, on a RabbitMQ node of its own. Each test gets
its own database; the PostgreSQL restart runs on a cluster of the test's own. Run with
``pytest tests/test_faults.py -s`` to see the recovery table; the ``large``
variants (marked ``slow``) run too; ``-m 'not slow'`` leaves them out. ``FAULT_SEED`` replays the random kill points of a run.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models.db import dispose_engine, session_scope
from models.seed import SeedResult, seed
from producer import resets
from tests import fault_support as fs
from tests import rabbitmq_support as rmq
from tests.reset_checks import snapshot, targeted

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("FAULT_SEED") or time.time_ns() % 1_000_000)
RECOVERY = fs.Recovery()

# Small on purpose: each scenario must fit in seconds on 2 cores. Batches of 25
# learners, each slowed to 0.15-0.45 s inside its transaction (install_batch_slowdown),
# give a fault something in flight to hit. Stale/lease/sweep settings are shortened
# so the database-driven recovery (the maintenance sweep) runs within the test.
LEARNERS = 700
BASE_ENV = {
    "RESET_BATCH_SIZE": "25",
    # Every component takes the deferred purge, however few its rows: the purge is a path under test.
    "RESET_PURGE_MIN_ROWS": "0",
    "RESET_BATCH_MAX_ATTEMPTS": "5",
    "RESET_BATCH_LEASE_SECONDS": "5",
    "RESET_JOB_STALE_SECONDS": "3",
    "PUBLISH_STALE_SECONDS": "2",
    "SWEEP_INTERVAL_SECONDS": "1",
    "RESET_PURGE_CHUNK_ROWS": "300",
    "NOTIFY_RATE_PER_SECOND": "5000",
    "NOTIFY_BACKEND": "console",
    "LOG_FORMAT": "json",
}
BATCH_SLEEP = 0.3
BATCH_QUEUES = "resets,reset_batches"
SIDE_QUEUES = "notifications,maintenance"


@pytest.fixture(scope="module", autouse=True)
def recovery_report():
    yield RECOVERY
    if RECOVERY.rows:
        print(f"\nrecovery times (FAULT_SEED={SEED}):\n{RECOVERY.table()}")
        target = os.environ.get("FAULT_TIMINGS_JSON")
        if target:
            Path(target).write_text(json.dumps({"seed": SEED, "scenarios": RECOVERY.rows}, indent=2) + "\n")


@dataclass(frozen=True)
class Scale:
    """Course size and the settings that go with it; ``large`` is marked ``slow``."""

    name: str
    learners: int
    env: dict
    slower: float  # recovery bounds are multiplied by this


SMALL = Scale("small", LEARNERS, {}, 1.0)
LARGE = Scale("large", 20_000, {"RESET_BATCH_SIZE": "500", "RESET_PURGE_CHUNK_ROWS": "5000"}, 4.0)
SCALES = [pytest.param(SMALL, id="small"), pytest.param(LARGE, id="large", marks=pytest.mark.slow)]


@pytest.fixture
def scale(request) -> Scale:
    return getattr(request, "param", SMALL)


BROKERS = ["redis", "rabbitmq"]


@pytest.fixture(params=BROKERS)
def broker(request) -> str:
    """Every scenario runs on both brokers: Redis, and RabbitMQ with quorum queues."""
    return request.param


@dataclass
class Stack:
    """One test's servers, environment and processes."""

    db_url: str
    broker: fs.Broker  # the Celery broker a scenario may stop, kill or wipe
    redis: fs.RedisServer  # REDIS_URL (rate limit, health replies); the broker too on Redis
    env: dict[str, str]
    console: Path
    procs: fs.Processes
    rng: random.Random
    scale: Scale = SMALL

    @property
    def learners(self) -> int:
        return self.scale.learners

    def bound(self, seconds: float) -> float:
        return seconds * self.scale.slower

    def label(self, scenario: str) -> str:
        label = f"{scenario} [{self.broker.kind}]"
        return label if self.scale is SMALL else f"{label} [{self.scale.name}: {self.learners} learners]"

    def workers(self, app: str = "workers") -> tuple[fs.CeleryProcess, fs.CeleryProcess]:
        """The batch worker (``resets,reset_batches``, 2 processes) and the side worker
        (``notifications,maintenance``, 1 process), started together."""
        side = self.procs.worker(self.env, SIDE_QUEUES, concurrency=1, name="side", app=app, wait=False)
        batches = self.procs.worker(self.env, BATCH_QUEUES, concurrency=2, name="batches", app=app, wait=False)
        side.wait_ready()
        batches.wait_ready()
        return batches, side

    def beat(self, name: str = "beat") -> fs.CeleryProcess:
        return self.procs.beat(self.env, name=name)


def make_stack(db_url: str, broker: fs.Broker, redis: fs.RedisServer, use_env, tmp_path: Path, request,
               scale: Scale, **env) -> Stack:
    console = tmp_path / "notifications.jsonl"
    values = {**BASE_ENV, **scale.env, "DATABASE_URL": db_url, "CELERY_BROKER_URL": broker.url(),
              "REDIS_URL": redis.url(), "NOTIFY_CONSOLE_PATH": str(console), **env}
    full_env = use_env(**values)
    rng = random.Random(f"{SEED}:{request.node.name}")
    return Stack(db_url, broker, redis, {k: full_env[k] for k in values}, console, fs.Processes(tmp_path), rng,
                 scale)


@pytest.fixture
def stack_factory(fresh_db, use_env, tmp_path, request, scale, broker):
    """``stack_factory(persistent=False, restartable=False, db_url=None, **env)`` -> a :class:`Stack`.

    On Redis the broker is a ``redis-server`` of the test's own (append-only file with
    ``persistent``). On RabbitMQ it is a virtual host of the test's own on the shared server, or,
    with ``restartable``, a RabbitMQ node of the test's own that the test may stop, kill and
    wipe (quorum queues keep their messages across a clean restart: ``persistent`` is moot).
    Everything is torn down after the test.
    """
    made: list[Stack] = []
    servers: list = []

    def make(persistent: bool = False, restartable: bool = False, db_url: str | None = None, **env) -> Stack:
        redis = fs.RedisServer(tmp_path / "redis", persistent=persistent and broker == "redis").start()
        servers.append(redis)
        if broker == "redis":
            target: fs.Broker = redis
        elif restartable:
            target = rmq.RabbitMQNode()
            servers.append(target)
            target.start()
        else:
            target = rmq.SharedVhost(request.getfixturevalue("rabbitmq_vhost")())
        stack = make_stack(db_url or fresh_db(), target, redis, use_env, tmp_path, request, scale, **env)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.procs.stop_all()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        # Shown under "Captured stdout teardown" of the failed test; the whole logs stay in tmp_path.
        for stack in made:
            for proc in stack.procs.started:
                print(f"--- {proc.name} (pid {proc.pid}) log tail, {proc.log_path} ---\n{proc.tail(60)}")
    dispose_engine()
    for server in servers:
        server.destroy() if isinstance(server, rmq.RabbitMQNode) else server.kill()


@pytest.fixture
def stack(stack_factory) -> Stack:
    return stack_factory()


def seed_org(learners: int = LEARNERS, random_seed: int = 7) -> SeedResult:
    with session_scope() as session:
        return seed(session, learners=learners, lessons=5, courses=2, completed_ratio=0.4, random_seed=random_seed)


def confirm_course_reset(org: SeedResult, course: int, reason: str = "fault drill") -> tuple[str, dict, set[int]]:
    """Request and confirm a course-wide reset; returns (job id, snapshot before, targeted learners)."""
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        req = resets.request(session, org.admin_id, course, reason=reason)
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)
    wanted = targeted(before, course)
    assert req.summary["learners"] == len(wanted)
    return job.job_id, before, wanted


def wait_inside_batch(stack: Stack, worker: fs.CeleryProcess, timeout: float = 30.0) -> dict[int, fs.Backend]:
    return fs.wait_until(lambda: fs.pids_inside_batch(stack.db_url, worker), timeout, interval=0.02,
                         what="a pool process inside a batch")


def extra_attempts(job_id: str) -> int:
    """Attempts beyond the first, over the job's learner batches (purge steps do not count attempts)."""
    return sum(row.attempts - 1 for row in fs.batch_rows(job_id) if row.kind == "learners")


# --- 0. Baseline: the same reset without a fault ----------------------------------------------

def test_baseline_without_faults(stack):
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    stack.workers()
    job_id, before, wanted = confirm_course_reset(org, course)
    fs.wait_for_job(job_id, timeout=stack.bound(60))
    st = fs.assert_outcome(before, job_id, course, wanted, stack.console)
    assert extra_attempts(job_id) == 0
    RECOVERY.duration(stack.label("0. baseline, no fault"), job_id, bound=stack.bound(30), learners=len(wanted),
                      batches=st["batches_total"])


# --- 1. SIGKILL of a pool process inside a batch, several times -------------------------------

def kill_inside(stack: Stack, worker: fs.CeleryProcess, prefer: str) -> str | None:
    """SIGKILL a pool process at a random point inside an open batch transaction (of kind ``prefer``
    when one shows up within a second). Returns the kind it hit, or None when the transaction
    turned out to have ended before the kill landed (checked in ``pg_stat_activity``)."""
    deadline = time.monotonic() + 1.0
    while True:
        inside = wait_inside_batch(stack, worker)
        chosen = sorted(pid for pid, backend in inside.items() if backend.kind == prefer)
        if chosen or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    pid = stack.rng.choice(chosen or sorted(inside))
    # The transaction has done part of its work and sleeps 0.15-0.45 s before the rest and its commit.
    time.sleep(stack.rng.uniform(0, 0.05))
    worker.kill_child(pid)
    fs.wait_until(lambda: fs.process_gone(pid), 5, interval=0.005, what=f"process {pid} to die")
    # A dead client cannot commit: if its transaction is still open now, the kill landed inside it.
    landed_inside = fs.transaction_still_open(stack.db_url, inside[pid])
    fs.wait_until(lambda: pid not in worker.children() and len(worker.children()) == 2, 15,
                  what="the pool to replace the killed process")
    return inside[pid].kind if landed_inside else None


@pytest.mark.parametrize("scale", SCALES, indirect=True)
def test_sigkill_pool_process_inside_batches(stack):
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, _side = stack.workers()
    # No beat: what a killed process held must come back by redelivery alone.
    job_id, before, wanted = confirm_course_reset(org, course)

    kills = {"learners": 0, "purge": 0, None: 0}
    for prefer in ("learners", "learners", "purge", "purge"):
        kills[kill_inside(stack, batches, prefer)] += 1
        last_kill = fs.utcnow()
    assert kills["learners"] + kills["purge"] >= 2, kills  # most kills land inside (sleep >> kill delay)

    fs.wait_for_job(job_id, timeout=stack.bound(60))
    fs.assert_outcome(before, job_id, course, wanted, stack.console)
    # Each kill inside a learner batch cost it exactly one more attempt: its work had rolled back.
    assert extra_attempts(job_id) >= kills["learners"], fs.batch_rows(job_id)
    RECOVERY.record(stack.label("1. SIGKILL a pool process inside a batch, 4 times"), last_kill, job_id,
                    bound=stack.bound(30),
                    kills_in_learner_batches=kills["learners"], kills_in_purge_steps=kills["purge"],
                    kills_just_after_commit=kills[None])


# --- 2. SIGKILL of the whole worker, then a new one ---------------------------------------------

@pytest.mark.parametrize("scale", SCALES, indirect=True)
def test_sigkill_whole_worker_then_new_worker(stack):
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, _side = stack.workers()
    stack.beat()
    job_id, before, wanted = confirm_course_reset(org, course)
    fs.wait_for_progress(job_id, 3)
    wait_inside_batch(stack, batches)
    batches.kill_all()
    fault_at = fs.utcnow()
    assert fs.job_status(job_id)["state"] == "running"
    stack.procs.worker(stack.env, BATCH_QUEUES, concurrency=2, name="batches-new")

    fs.wait_for_job(job_id, timeout=stack.bound(90))
    fs.assert_outcome(before, job_id, course, wanted, stack.console)
    RECOVERY.record(stack.label("2. SIGKILL whole worker, new worker started"), fault_at, job_id,
                    bound=stack.bound(45))


# --- 3. SIGTERM (rolling deploy) ----------------------------------------------------------------

def test_sigterm_hands_back_in_flight_work(stack):
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, _side = stack.workers()
    # No beat: whatever the old worker held must come back through the broker alone.
    job_id, before, wanted = confirm_course_reset(org, course)
    fs.wait_for_progress(job_id, 3)
    wait_inside_batch(stack, batches)
    batches.terminate()
    fault_at = fs.utcnow()
    assert batches.wait(30) == 0, batches.tail()
    st = fs.job_status(job_id)
    assert st["state"] == "running" and st["batches_done"] < st["batches_total"], st
    stack.procs.worker(stack.env, BATCH_QUEUES, concurrency=2, name="batches-new")

    fs.wait_for_job(job_id, timeout=stack.bound(60))
    fs.assert_outcome(before, job_id, course, wanted, stack.console)
    # The batches in flight finished in the old worker; none was interrupted or retried.
    assert extra_attempts(job_id) == 0, fs.batch_rows(job_id)
    RECOVERY.record(stack.label("3. SIGTERM (warm shutdown), new worker started"), fault_at, job_id,
                    bound=stack.bound(30))


# --- 4. The broker restarted mid-fan-out, with and without its data ----------------------------

@pytest.mark.parametrize("scale", SCALES, indirect=True)
@pytest.mark.parametrize("wiped", [False, True], ids=["data-kept", "data-wiped"])
def test_broker_restarted_mid_fan_out(stack_factory, wiped):
    stack = stack_factory(persistent=not wiped, restartable=True)
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, side = stack.workers()
    stack.beat()
    job_id, before, wanted = confirm_course_reset(org, course)
    fs.wait_for_progress(job_id, 3)
    queued = stack.broker.messages()
    if wiped:
        # Every queued and unacknowledged message is gone (RabbitMQ: queues and exchanges too).
        stack.broker.kill()
        stack.broker.wipe()
    else:
        # Redis: append-only file, fsync always; RabbitMQ: quorum queues on disk. Everything
        # acknowledged to a publisher survives.
        stack.broker.stop()
    fault_at = fs.utcnow()
    time.sleep(2)
    assert fs.job_status(job_id)["state"] == "running"
    stack.broker.start()

    fs.wait_for_job(job_id, timeout=stack.bound(90))
    fs.assert_outcome(before, job_id, course, wanted, stack.console)
    resumed = side.count_events("maintenance.job.resumed")
    what = "data wiped" if wiped else "data kept"
    RECOVERY.record(stack.label(f"4. broker restarted mid-fan-out ({what}, down 2 s)"), fault_at, job_id,
                    bound=stack.bound(60), messages_queued_before=queued, sweep_resumed_job=resumed)


# --- 5. The broker down when the admin confirms -------------------------------------------------

def test_broker_down_at_confirm(stack_factory):
    stack = stack_factory(restartable=True)
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    _batches, _side = stack.workers()
    stack.beat()
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        req = resets.request(session, org.admin_id, course, reason="broker down")
    stack.broker.stop()
    started = time.monotonic()
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)
    confirm_seconds = time.monotonic() - started
    # The confirm committed the job (queued) and returned promptly; only the publish failed.
    assert job.state == "queued"
    assert confirm_seconds < 10, confirm_seconds
    time.sleep(2)
    assert fs.job_status(job.job_id)["state"] == "queued"
    stack.broker.start()
    back_at = fs.utcnow()

    fs.wait_for_job(job.job_id, timeout=stack.bound(60))
    wanted = targeted(before, course)
    fs.assert_outcome(before, job.job_id, course, wanted, stack.console)
    RECOVERY.record(stack.label("5. broker down at confirm (job queued, runs when the broker is back)"), back_at,
                    job.job_id, bound=stack.bound(30), confirm_seconds=round(confirm_seconds, 2))


# --- 6. PostgreSQL connections terminated, and PostgreSQL restarted -----------------------------

def test_postgres_backends_terminated_mid_batch(stack):
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, _side = stack.workers()
    # Beat runs, as in production: a notification run whose connection is cut leaves its rows to
    # the notification sweep. The reset tasks must not need it (checked below).
    stack.beat()
    job_id, before, wanted = confirm_course_reset(org, course)
    terminated = 0
    deadline = time.monotonic() + 60
    while terminated < 3:
        # A batch seen asleep may wake and commit before the terminate reaches it: look again.
        fs.wait_until(lambda: fs.backends_inside_batch(stack.db_url), 30, interval=0.02, what="a batch in flight")
        terminated += fs.terminate_batch_backends(stack.db_url)
        last_fault = fs.utcnow()
        assert time.monotonic() < deadline, f"only {terminated} batches caught in flight"
        time.sleep(0.3)
    # And once every connection of the database, idle pooled ones included.
    fs.terminate_all_backends(stack.db_url)

    fs.wait_for_job(job_id, timeout=stack.bound(90))
    retried = [r for r in fs.batch_rows(job_id) if r.kind == "learners" and r.attempts > 1]
    assert terminated >= 3
    # Every failed attempt was retried by its own task (none gave up and left it to a sweep).
    assert not batches.failed_tasks(), batches.failed_tasks()
    RECOVERY.record(stack.label("6a. pg_terminate_backend inside batches (x3) + all connections"), last_fault,
                    job_id, bound=stack.bound(30), backends_terminated=terminated,
                    learner_batches_retried=len(retried))
    fs.assert_outcome(before, job_id, course, wanted, stack.console)


@pytest.mark.parametrize("scale", SCALES, indirect=True)
def test_postgres_restarted_mid_batch(fresh_db, stack_factory, request):
    cluster = fs.PostgresCluster().init()
    request.addfinalizer(cluster.destroy)
    cluster.start()
    stack = stack_factory(db_url=cluster.create_database("faults"))
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, _side = stack.workers()
    stack.beat()
    job_id, before, wanted = confirm_course_reset(org, course)
    fs.wait_for_progress(job_id, 3)
    fs.wait_until(lambda: fs.backends_inside_batch(stack.db_url), 30, interval=0.02, what="a batch in flight")
    cluster.stop("fast")  # every session ends, open transactions roll back
    fault_at = fs.utcnow()
    time.sleep(2)
    cluster.start()
    dispose_engine()

    fs.wait_for_job(job_id, timeout=stack.bound(90))
    # While PostgreSQL was down every reset task retried with backoff; none failed and dropped its message.
    assert not batches.failed_tasks(), batches.failed_tasks()
    RECOVERY.record(stack.label("6b. PostgreSQL restarted (fast shutdown, down 2 s)"), fault_at, job_id,
                    bound=stack.bound(60),
                    database_retries=batches.count_events("task.retry"))
    fs.assert_outcome(before, job_id, course, wanted, stack.console)


# --- 7. Every message published twice, concurrently --------------------------------------------

@pytest.mark.parametrize("scale", SCALES, indirect=True)
def test_every_message_published_twice(stack):
    from workers.app import app

    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP / 3)
    # Worker processes publish every follow-up twice (same task id, another connection, same moment).
    batches, side = stack.workers(app="tests.fault_support:duplicating_app")
    duplicator = fs.DuplicatePublisher(app).install()  # and so does this producer (resets.start)
    try:
        job_id, before, wanted = confirm_course_reset(org, course)
        fs.wait_for_job(job_id, timeout=stack.bound(90))
    finally:
        duplicator.uninstall()
    fs.assert_outcome(before, job_id, course, wanted, stack.console)

    assert duplicator.copies >= 1 and duplicator.failures == 0
    logs = batches.log_text() + side.log_text()
    assert logs.count("fault.duplicate.failed") == 0
    rows = fs.batch_rows(job_id)
    learner_batches = [r for r in rows if r.kind == "learners"]
    # Both copies of every wake-up (one is published after each unit) reached a worker.
    received = len(re.findall(r"Task resets\.work\[[0-9a-f-]+\] received", logs))
    assert received >= 2 * len(learner_batches), (received, len(learner_batches))
    assert logs.count("fault.duplicate.published task=notifications.send") >= 1
    RECOVERY.duration(stack.label("7. every message published twice, concurrently"), job_id,
                      bound=stack.bound(60),
                      duplicates_published=logs.count("fault.duplicate.published") + duplicator.copies,
                      run_batch_deliveries=received, learner_batches=len(learner_batches))


# --- 8. A poison batch ---------------------------------------------------------------------------

POISON_ATTEMPTS = 3


def _watch_claims(job_id: str, batch_no: int, stop: threading.Event, seen: list) -> None:
    """Record every distinct claim of one batch (its attempts counter and claim time)."""
    from models.schema import ResetBatch

    b = ResetBatch.__table__.c
    while not stop.is_set():
        with session_scope() as session:
            row = session.execute(select(b.attempts, b.claimed_at, b.state).where(
                b.job_id == uuid.UUID(job_id), b.batch_no == batch_no)).one()
        if row.attempts and (not seen or seen[-1][0] != row.attempts):
            seen.append((row.attempts, row.claimed_at, row.state))
        time.sleep(0.01)


def test_poison_batch_is_dead_lettered(stack_factory):
    stack = stack_factory(RESET_BATCH_MAX_ATTEMPTS=str(POISON_ATTEMPTS))
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
    wanted = targeted(before, course)
    poisoned = sorted(wanted)[len(wanted) // 2]
    # Every attempt to restart this learner's assignment fails: a learner whose rows break the batch.
    message = fs.install_assignment_poison(stack.db_url, poisoned, course)
    stack.workers()
    job_id, before, wanted = confirm_course_reset(org, course)
    fs.wait_until(lambda: fs.job_status(job_id)["batches_total"], 30, what="batches planned")
    bad = next(r for r in fs.batch_rows(job_id) if r.kind == "learners" and r.lo_user_id < poisoned <= r.hi_user_id)
    stop, claims = threading.Event(), []
    watcher = threading.Thread(target=_watch_claims, args=(job_id, bad.batch_no, stop, claims), daemon=True)
    watcher.start()
    try:
        st = fs.wait_for_job(job_id, timeout=stack.bound(90))
        time.sleep(2)  # nothing may retry it after the job ended
    finally:
        stop.set()
        watcher.join(5)

    assert st["state"] == "failed", st
    assert f"batch {bad.batch_no} " in st["error"] and message in st["error"], st["error"]
    assert f"dead-lettered after {POISON_ATTEMPTS} attempts" in st["error"], st["error"]
    row = next(r for r in fs.batch_rows(job_id) if r.batch_no == bad.batch_no)
    assert row.state == "dead" and row.attempts == POISON_ATTEMPTS + 1, row
    # The other batches finished; the dead batch's learners were left exactly as they were.
    others = [r for r in fs.batch_rows(job_id) if r.batch_no != bad.batch_no]
    assert all(r.state == "done" for r in others), [(r.batch_no, r.state) for r in others]
    spared = {u for u in wanted if bad.lo_user_id < u <= bad.hi_user_id}
    fs.assert_outcome(before, job_id, course, wanted - spared, stack.console, state="failed")
    # No tight loop: exactly max attempts + the dead-lettering claim, spread out by the backoff.
    times = [c[1] for c in claims]
    gaps = [round((b - a).total_seconds(), 2) for a, b in zip(times, times[1:])]
    assert [c[0] for c in claims][-1] == POISON_ATTEMPTS + 1
    assert (times[-1] - times[0]).total_seconds() >= 0.1, gaps
    RECOVERY.record(stack.label(f"8. poison batch dead-lettered after {POISON_ATTEMPTS} attempts "
                                "(first claim -> job failed)"),
                    times[0], job_id, bound=stack.bound(30), claim_gaps_seconds=gaps, learners_spared=len(spared))


def test_poison_row_in_the_purge_is_contained(stack_factory):
    """A row the purge can never delete (one learner's assessment result) must cost only that row.

    The learner phase has restarted every attempt before the purge runs, so the purge cannot
    spare whole learners; what it must do is clear every other row and end the job ``failed``
    naming the row that stayed and why.
    """
    from models.components import RESET_COMPONENTS

    stack = stack_factory(RESET_BATCH_MAX_ATTEMPTS=str(POISON_ATTEMPTS))
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
    completed = sorted(u for (c, u), s in before.items() if c == course and s.status == "completed")
    poisoned = completed[len(completed) // 2]
    message = fs.install_poison(stack.db_url, poisoned, table="assessment_results")
    stuck_row = fs.run_sql(stack.db_url, "SELECT id FROM assessment_results "
                                         "WHERE course_id = %(c)s AND user_id = %(u)s",
                           {"c": course, "u": poisoned})[0][0]
    stack.workers()
    job_id, before, wanted = confirm_course_reset(org, course)
    st = fs.wait_for_job(job_id, timeout=stack.bound(90))
    time.sleep(1)

    assert st["state"] == "failed", st
    # The error names the reason and the row that could not be deleted.
    assert message in st["error"] and str(stuck_row) in st["error"], st["error"]
    component = [c.name for c in RESET_COMPONENTS].index("assessment_results")
    with session_scope() as session:
        after = snapshot(session, org.course_ids)
    left = {u: s.rows for (c, u), s in after.items() if c == course and any(s.rows)}
    # Only the poisoned learner's undeletable assessment row remains; every other learner is clear.
    expected = tuple(before[(course, poisoned)].rows[i] if i == component else 0
                     for i in range(len(RESET_COMPONENTS)))
    assert left == {poisoned: expected}, f"{len(left)} learners keep rows, e.g. {dict(list(left.items())[:3])}"
    for (c, u), state in after.items():
        if c == course and u in wanted:
            assert (state.attempt, state.status) == (before[(c, u)].attempt + 1, "not_started"), (u, state)
        else:
            assert state == before[(c, u)], (c, u)
    RECOVERY.duration(stack.label("8b. poison row in the purge (job failed naming it)"), job_id,
                      bound=stack.bound(30), learners_with_rows_left=len(left))


# --- 9. Training goes on during the reset (R10) -----------------------------------------------

def _lesson_ids(course: int) -> list[int]:
    from models.schema import CourseItem

    with session_scope() as session:
        return list(session.scalars(select(CourseItem.id).where(CourseItem.course_id == course,
                                                                CourseItem.kind == "lesson")).all())


def test_assign_unassign_and_activity_during_reset(stack):
    from models.schema import CourseAssignment, Notification, User
    from models.training import assign_course, create_user, record_activity, unassign_course

    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP / 2)
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        newcomers = [create_user(session, org.organization_id, f"New {n}",
                                 f"new{n}.org{org.organization_id}@example.com",
                                 notify_course_assigned=n % 3 != 0).id for n in range(20)]
    wanted = targeted(before, course)
    rng = stack.rng
    pool = sorted(wanted)
    active = set(rng.sample(pool, 30))
    leaving = set(rng.sample(sorted(set(pool) - active), 15))
    idle = sorted(u for (c, u), s in before.items() if c == course and s.status == "not_started")
    starters = set(rng.sample(idle, 15))
    lessons = _lesson_ids(course)
    _batches, _side = stack.workers()

    log: list[tuple[int, int]] = []  # (learner, attempt) of every committed activity
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        return threading.Thread(target=run, daemon=True)

    def activity(learners: list[int]):
        r = random.Random(rng.random())
        while not stop.is_set():
            u = r.choice(learners)
            with session_scope() as session:
                result = record_activity(session, course, u, r.choice(lessons))
            log.append((u, result.attempt))
            time.sleep(r.uniform(0, 0.02))

    def assigning():
        r = random.Random(rng.random())
        for u in newcomers:
            with session_scope() as session:
                assign_course(session, course, u)
            if r.random() < 0.6:
                with session_scope() as session:
                    log.append((u, record_activity(session, course, u, r.choice(lessons)).attempt))
            time.sleep(r.uniform(0.05, 0.2))

    def unassigning():
        r = random.Random(rng.random())
        for u in sorted(leaving):
            with session_scope() as session:
                assert unassign_course(session, course, u)
            time.sleep(r.uniform(0.05, 0.3))

    job_id, _, _ = confirm_course_reset(org, course)
    threads = [guarded(lambda: activity(sorted(active))), guarded(lambda: activity(sorted(starters))),
               guarded(assigning), guarded(unassigning)]
    for t in threads:
        t.start()
    st = fs.wait_for_job(job_id, timeout=stack.bound(90))
    time.sleep(0.5)  # activity keeps going after the job: it belongs to the new attempt
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert st["state"] == "succeeded", st
    fs.wait_for_notifications(job_id)

    from models import analytics
    from models.components import RESET_COMPONENTS

    touched = active | leaving | starters | set(newcomers)
    job = uuid.UUID(job_id)
    with session_scope() as session:
        after = snapshot(session, org.course_ids)
        # Everyone the threads did not touch: exactly the plain reset.
        for key, old in before.items():
            c, u = key
            if c == course and u in touched:
                continue
            new = after[key]
            if c == course and u in wanted:
                assert (new.attempt, new.last_reset_job_id, new.status, sum(new.rows)) == \
                    (old.attempt + 1, job, "not_started", 0), (key, old, new)
            else:
                assert new == old, (key, old, new)
        # Removed learners: nothing of theirs is left in the course.
        for u in leaving:
            assert (course, u) not in after
        # Learners who worked during the job: progress of the attempt they are on now is all
        # there (never lost), progress of an earlier attempt is all gone (never survives).
        rows_by_attempt: dict[tuple[int, int], int] = {}
        for component in RESET_COMPONENTS:
            t = component.table
            for u, attempt, n in session.execute(
                    select(t.c.user_id, t.c.attempt, func.count()).where(t.c.course_id == course)
                    .group_by(t.c.user_id, t.c.attempt)):
                rows_by_attempt[(u, attempt)] = rows_by_attempt.get((u, attempt), 0) + n
        reset_now = set()
        for u in active | starters | set(newcomers):
            state = after.get((course, u))
            assert state is not None, u
            old_attempt = before[(course, u)].attempt if (course, u) in before else 1
            if u in active:
                assert state.last_reset_job_id == job and state.attempt == old_attempt + 1, (u, state)
            else:
                assert state.attempt in (old_attempt, old_attempt + 1), (u, state)
                assert (state.last_reset_job_id == job) == (state.attempt == old_attempt + 1), (u, state)
            if state.last_reset_job_id == job:
                reset_now.add(u)
            lessons_now = sum(1 for lu, a in log if lu == u and a == state.attempt)
            stale = {a: n for (lu, a), n in rows_by_attempt.items() if lu == u and a != state.attempt}
            assert not stale, f"learner {u} on attempt {state.attempt} still has rows of attempts {stale}"
            kept = rows_by_attempt.get((u, state.attempt), 0)
            # Seeded rows of the current attempt (a learner never reset) plus every lesson logged for it.
            seeded = sum(before[(course, u)].rows) if (course, u) in before and state.attempt == old_attempt else 0
            assert kept == seeded + lessons_now, (u, state, kept, seeded, lessons_now)
        for c in org.course_ids:
            assert analytics.read_analytics(session, c) == analytics.count_from_rows(session, c), c
        # One notification per learner this job reset (learners removed later may have theirs too).
        n = Notification.__table__.c
        counts = dict(session.execute(select(n.user_id, func.count()).where(n.reset_job_id == job)
                                      .group_by(n.user_id)).all())
        assert all(v == 1 for v in counts.values())
        u_t = User.__table__.c
        reset_assigned = set(session.scalars(select(CourseAssignment.user_id).where(
            CourseAssignment.course_id == course, CourseAssignment.last_reset_job_id == job)).all())
        notify_on = set(session.scalars(select(u_t.id).where(u_t.notify_course_assigned)).all())
        assert set(counts) - leaving == reset_assigned & notify_on
        st = fs.job_status(job_id)
        assert len(reset_assigned) <= st["learners_done"] <= len(reset_assigned) + len(leaving), st
        fs.assert_notifications_delivered_once(session, job_id, stack.console)
    RECOVERY.duration(stack.label("9. assign/unassign/activity during the reset"), job_id, bound=stack.bound(60),
                      activities=len(log),
                      starters_reset=len(reset_now & starters), newcomers_reset=len(reset_now & set(newcomers)))


# --- 10. Two beat processes at once -------------------------------------------------------------

def test_two_beats_do_no_work_twice(stack):
    from models.schedule import schedule_of
    from models.schema import CampaignOccurrence, ResetJob, RetrainingCampaign
    from producer import campaigns

    org = seed_org(stack.learners)
    manual_course, campaign_course = org.course_ids
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        req = campaigns.request_campaign(session, org.admin_id, campaign_course, cron="0 3 1 1 *",
                                         time_zone="UTC", reason="yearly retraining")
    with session_scope() as session:
        campaigns.confirm_campaign(session, org.admin_id, req.campaign_id, req.token)
    with session_scope() as session:
        # Make this year's occurrence due now (as if the beat had been down since).
        campaign = session.get(RetrainingCampaign, req.campaign_id)
        due = schedule_of(campaign).latest_at_or_before(fs.utcnow())
        campaign.next_occurrence_at = due
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, side = stack.workers()
    job_id, _, wanted = confirm_course_reset(org, manual_course)
    beats = [stack.beat("beat-a"), stack.beat("beat-b")]
    # Lose the batch worker mid-job, so both beats' sweeps race to resume the same batches.
    fs.wait_for_progress(job_id, 3)
    batches.kill_all()
    fault_at = fs.utcnow()
    stack.procs.worker(stack.env, BATCH_QUEUES, concurrency=2, name="batches-new")

    campaign_job = fs.wait_until(lambda: _campaign_jobs(req.campaign_id), 30, what="the campaign's job")
    fs.wait_for_job(job_id, timeout=stack.bound(90))
    fs.wait_for_job(campaign_job[0], timeout=stack.bound(90))
    time.sleep(3)  # several more ticks of both beats
    for beat in beats:
        assert beat.log_text().count("Sending due task maintenance-sweep") >= 3, beat.tail()
        assert beat.log_text().count("Sending due task campaigns-dispatch-due") >= 3, beat.tail()

    assert _campaign_jobs(req.campaign_id) == campaign_job, "one occurrence made two jobs"
    with session_scope() as session:
        occurrences = session.execute(select(CampaignOccurrence.occurrence_at, CampaignOccurrence.outcome,
                                             CampaignOccurrence.job_id)
                                      .where(CampaignOccurrence.campaign_id == req.campaign_id)).all()
        assert [(o.outcome, str(o.job_id)) for o in occurrences] == [("queued", campaign_job[0])], occurrences
        jobs = session.scalar(select(func.count()).select_from(ResetJob).where(ResetJob.state == "succeeded"))
        assert jobs == 2
    # Each job against its own course (together: nothing else touched).
    fs.assert_outcome(_of_course(before, manual_course), job_id, manual_course, wanted, stack.console)
    fs.assert_outcome(_of_course(before, campaign_course), campaign_job[0], campaign_course,
                      targeted(before, campaign_course), stack.console)
    RECOVERY.record(stack.label("10. two beats; worker SIGKILLed, both sweeps resume it"), fault_at, job_id,
                    bound=stack.bound(45),
                    sweeps_resuming=side.count_events("maintenance.job.resumed"),
                    campaign_jobs=len(campaign_job))


def _of_course(before: dict, course: int) -> dict:
    return {key: state for key, state in before.items() if key[0] == course}


def _campaign_jobs(campaign_id: int) -> list[str]:
    from models.schema import ResetJob

    with session_scope() as session:
        return [str(i) for i in session.scalars(select(ResetJob.id).where(ResetJob.campaign_id == campaign_id))]


# --- 11. A webhooks worker killed while delivering an event ---------------------------------------

def test_webhooks_worker_killed_while_delivering_an_event(stack_factory):
    """The receiver holds the first request (``reset.confirmed``) open; the pool process sending it is
    SIGKILLed mid-request. The message comes back (late ack), finds the delivery still leased, and
    wakes when the lease ends: the receiver gets the same event id again and answers it, and the
    ``reset.succeeded`` event, held back to keep the job's order, follows it."""
    from tests.webhook_support import Receiver

    stack = stack_factory(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true", WEBHOOKS_TIMEOUT_SECONDS="3")
    receiver = Receiver(hang=True, hang_seconds=60).start()
    try:
        org = seed_org(stack.learners)
        course = org.course_ids[0]
        endpoint_id = fs.subscribe_receiver(org.organization_id, receiver, ["reset.confirmed", "reset.succeeded"])
        stack.workers()
        hooks = stack.procs.worker(stack.env, "webhooks", concurrency=1, name="hooks")
        job_id, before, wanted = confirm_course_reset(org, course)

        assert receiver.arrived.wait(30), "the first delivery never reached the receiver"
        held = receiver.got()[0]
        assert held.event_type == "reset.confirmed" and held.attempt == 1
        (pid,) = hooks.children()
        fault_at = fs.utcnow()
        hooks.kill_child(pid)  # inside the HTTP call: the receiver has not answered yet
        fs.wait_until(lambda: fs.process_gone(pid), 5, interval=0.005, what=f"process {pid} to die")
        receiver.release()  # from now on the receiver answers 200 at once

        fs.wait_for_job(job_id, timeout=stack.bound(60))
        fs.assert_outcome(before, job_id, course, wanted, stack.console)
        rows = fs.wait_until(lambda: (r := fs.webhook_deliveries(endpoint_id)) and all(
            x.status == "delivered" for x in r) and len(r) == 2 and r, stack.bound(60), interval=0.2,
            what="both events delivered")
        confirmed, succeeded = rows
        assert (confirmed.type, succeeded.type) == ("reset.confirmed", "reset.succeeded")
        assert str(confirmed.event_id) == held.event_id and confirmed.attempts == 2, confirmed
        got = receiver.got()
        assert [(r.event_id, r.attempt) for r in got] == [
            (str(confirmed.event_id), 1), (str(confirmed.event_id), 2), (str(succeeded.event_id), 1)], \
            "the same event id again, then the next event of the job"
        assert all(r.signature_ok for r in got)
        seconds = (confirmed.delivered_at - fault_at).total_seconds()
        RECOVERY.rows[stack.label("11. webhooks worker SIGKILLed while delivering an event")] = {
            "recovery_seconds": round(seconds, 2), "bound_seconds": 30,
            "requests_received": len(receiver.got()), "event_ids": len({r.event_id for r in receiver.got()})}
        assert seconds <= 30, f"the event was delivered {seconds:.1f}s after the kill (lease 19s)"
    finally:
        receiver.stop()


# --- 12. Cancel while a killed worker held a batch, and the broker lost its message -------------

def test_cancel_after_the_worker_holding_a_batch_was_killed_and_the_broker_lost_its_message(stack_factory):
    """Issue 13, item 11: the whole worker group is SIGKILLed inside a learner batch, the job is
    cancelled, the broker restarts empty, and a new worker starts (with beat). The job must still end
    ``cancelled``, its final audit event must count exactly the learners whose attempt it moved,
    and none of them may keep a row of an earlier attempt."""
    from tests.test_cancel import _earlier_attempt_rows, _final_audit, _reset_learners

    stack = stack_factory(restartable=True)
    org = seed_org(stack.learners)
    course = org.course_ids[0]
    fs.install_batch_slowdown(stack.db_url, BATCH_SLEEP)
    batches, side = stack.workers()
    job_id, _before, _wanted = confirm_course_reset(org, course)
    fs.wait_for_progress(job_id, 3)
    wait_inside_batch(stack, batches)
    batches.kill_all()
    side.kill_all()
    fault_at = fs.utcnow()
    with session_scope() as session:
        st = resets.cancel(session, job_id, org.admin_id)
    assert st["state"] == "cancelling", st
    stack.broker.kill()  # and wiped: the dead worker's message and the finalize are gone
    stack.broker.wipe()
    stack.broker.start()
    stack.workers()
    stack.beat()

    st = fs.wait_for_job(job_id, timeout=stack.bound(90), states=("cancelled",))
    with session_scope() as session:
        reset_ids = _reset_learners(session, job_id, course)
        final = _final_audit(session, job_id)
        assert (final.action, final.learner_count) == ("reset.cancelled", len(reset_ids)), final.learner_count
        assert st["learners_done"] == len(reset_ids) > 0
        assert _earlier_attempt_rows(session, course, reset_ids) == 0
    RECOVERY.record(stack.label("12. cancel after SIGKILL inside a batch, broker wiped"), fault_at, job_id,
                    bound=stack.bound(60), learners_reset=len(reset_ids))
