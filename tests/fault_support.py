"""Fault injection for ``tests/test_faults.py``: throwaway servers, real processes, kill points, checks.

- :class:`RedisServer` / :class:`PostgresCluster`: servers of the test's own, on free
  loopback ports, from the installed binaries, that a test may stop, kill, wipe and
  restart (RabbitMQ's: ``tests.rabbitmq_support``). The machine's shared PostgreSQL, Redis
  and RabbitMQ are never restarted.
- :class:`CeleryProcess`: ``celery worker`` / ``celery beat`` in a process group of its
  own, so a test can SIGKILL one pool process, the whole worker, or SIGTERM it.
- :func:`install_batch_slowdown` / :func:`pids_inside_batch`: a statement trigger makes
  every batch sleep after its first DELETE, so "inside a batch" is a real state a test
  can wait for; the worker processes in it are found from ``pg_stat_activity`` and the
  kernel's socket table, so a kill lands inside an open batch transaction.
- :class:`DuplicatePublisher`: every task message published twice, concurrently, with
  the same task id (what a broker redelivery looks like). Worker processes get it with
  ``-A tests.fault_support:duplicating_app``.
- :func:`assert_outcome`: the pass criterion of every scenario, read from the database
  (and the console notification file for deliveries).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.notify_support import free_port, wait_until  # noqa: E402,F401 - shared test helpers
from workers.processes import CeleryProcess as BaseCeleryProcess  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("FAULT_PG_BIN", "/usr/lib/postgresql/15/bin"))
READY_SECONDS = 40.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --- Brokers -----------------------------------------------------------------------------------

class Broker(Protocol):
    """What a scenario does to its broker: :class:`RedisServer`, or on RabbitMQ
    ``tests.rabbitmq_support.RabbitMQNode`` (a node of the test's own) and ``SharedVhost``
    (a virtual host on the shared server, never restarted)."""

    kind: str

    def url(self) -> str: ...

    def start(self): ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def wipe(self) -> None: ...

    def messages(self) -> int:
        """Messages waiting in the project's queues."""


class RedisServer:
    """``redis-server`` on a free loopback port, in a directory of its own.

    ``persistent=True``: append-only file with ``appendfsync always`` (the broker
    keeps its queues across a restart, as in docker-compose.yml); otherwise nothing
    is ever written to disk and a restart starts empty.
    """

    kind = "redis"

    def __init__(self, workdir: Path, persistent: bool = False, port: int | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = port or free_port()
        self.popen: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
                "--maxmemory-policy", "noeviction"]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.ping, 15, what=f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url(), socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: with the append-only file on, everything acknowledged is on disk)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(15)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)

    def wipe(self) -> None:
        """Forget everything on disk (only meaningful while stopped)."""
        for path in self.dir.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def messages(self) -> int:
        import redis

        from models.queues import QUEUES

        client = redis.Redis.from_url(self.url())
        try:
            return sum(int(client.llen(queue)) for queue in QUEUES)
        finally:
            client.close()


# --- PostgreSQL --------------------------------------------------------------------------------

def _as_postgres_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as ``postgres`` when we are root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


class PostgresCluster:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a free loopback port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        # Not under pytest's tmp_path: that is mode 0700 and owned by root, and the
        # server runs as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="pr-faults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        run = subprocess.run(_as_postgres_user(list(argv)), capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {run.stderr or run.stdout}\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return ""

    def init(self) -> "PostgresCluster":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "-N")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.dir}'\nfsync = off\nmax_connections = 100\n"
                       "shared_buffers = 32MB\n")
        return self

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every session is ended, open transactions roll back; ``immediate``: a crash."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        run = subprocess.run(_as_postgres_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]),
                             capture_output=True, text=True)
        return run.returncode == 0

    def create_database(self, name: str) -> str:
        """A migrated database in this cluster; returns its URL."""
        from models.migrate import upgrade

        engine = create_engine(self.admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        url = make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        return url

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Celery processes --------------------------------------------------------------------------

class CeleryProcess(BaseCeleryProcess):
    """``celery worker`` or ``celery beat`` started by a test, in a process group of its own,
    with what the fault scenarios need on top: targeted kills and counts from its log."""

    def tail(self, lines: int = 40) -> str:
        return self.log_tail(lines)

    def wait_for_log(self, pattern: str, timeout: float = READY_SECONDS) -> re.Match:
        return super().wait_for_log(pattern, timeout)

    def wait_ready(self) -> None:
        self.wait_for_log(r"\bready\.\s*$")

    def count_events(self, name: str) -> int:
        """How many times the project's log event ``name`` appears in this process's log."""
        return len(re.findall(rf"\] {re.escape(name)}\s*$|\"event\": \"{re.escape(name)}\"", self.log_text(),
                              re.MULTILINE))

    def failed_tasks(self, prefix: str = "resets.") -> list[str]:
        """Log lines of tasks named ``prefix...`` that ended with an exception (their message is gone)."""
        return re.findall(rf"Task {re.escape(prefix)}\w+\[[0-9a-f-]+\] raised unexpected: [^\n]*", self.log_text())

    def kill_child(self, pid: int) -> None:
        """SIGKILL one pool process (the main process notices and starts another)."""
        assert pid in self.children(), f"{pid} is not a pool process of {self.name}"
        os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """``kill -9`` of the main process and every pool process at once (the group this test made)."""
        if self.popen.returncode is not None:
            return  # already exited and reaped (its pool processes exit before it); the id may be reused
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown, then ``kill -9`` of the group if it takes longer than ``timeout``."""
        self.terminate()
        if self.wait(timeout) is None:
            self.kill_all()


class Processes:
    """Starts worker and beat processes for one test and stops every one of them at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.started: list[CeleryProcess] = []

    def _spawn(self, argv: list[str], env: dict[str, str], name: str) -> CeleryProcess:
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
        with open(log_path, "ab") as log:
            popen = subprocess.Popen([sys.executable, "-m", "celery", *argv], cwd=REPO_ROOT, env=full_env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        proc = CeleryProcess(popen, log_path, name)
        self.started.append(proc)
        return proc

    def worker(self, env: dict[str, str], queues: str, concurrency: int = 2, name: str = "w",
               app: str = "workers", wait: bool = True) -> CeleryProcess:
        """``celery worker -Q queues``; by default returns once it is ready (``wait=False``: at once,
        then :meth:`CeleryProcess.wait_ready`)."""
        proc = self._spawn(["-A", app, "worker", "-Q", queues, "-c", str(concurrency), "-P", "prefork",
                            "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--without-mingle", "--without-gossip",
                            "--without-heartbeat", "-l", "info"], env, name)
        if wait:
            proc.wait_ready()
        return proc

    def beat(self, env: dict[str, str], name: str = "beat", app: str = "tests.fault_support:fast_beat_app"
             ) -> CeleryProcess:
        schedule = self.log_dir / f"{name}-{len(self.started)}-schedule"
        proc = self._spawn(["-A", app, "beat", "-l", "info", "-s", str(schedule),
                            "--pidfile", str(self.log_dir / f"{name}-{len(self.started)}.pid")], env, name)
        proc.wait_for_log(r"beat: Starting")
        return proc

    def stop_all(self) -> None:
        """The test is over: ``kill -9`` every process group it started (nothing to wait for)."""
        for proc in self.started:
            proc.kill_all()


# --- Apps for subprocesses (``celery -A tests.fault_support:<name>``) --------------------------

def _fast_beat_app():
    """The project's app with the campaign dispatch ticking as often as the sweep (the project's 60 s
    would make a two-beat test wait a minute for its first tick)."""
    from models.settings import get_settings
    from workers.app import app

    interval = get_settings().sweep_interval_seconds
    schedule = dict(app.conf.beat_schedule)
    schedule["campaigns-dispatch-due"] = dict(schedule["campaigns-dispatch-due"], schedule=interval)
    app.conf.beat_schedule = schedule
    return app


def _duplicating_app():
    """The project's app, publishing every task message twice from this process."""
    from workers.app import app

    DuplicatePublisher(app, report=True).install()
    return app


def __getattr__(name: str):
    # Resolved lazily so that importing this module in the test process changes nothing:
    # only a process started with ``-A tests.fault_support:<name>`` builds these apps.
    if name == "fast_beat_app":
        return _fast_beat_app()
    if name == "duplicating_app":
        return _duplicating_app()
    raise AttributeError(name)


# --- Every message twice -----------------------------------------------------------------------

class DuplicatePublisher:
    """On every task publish, publish an identical copy (same task id) at the same moment from
    another thread and another broker connection, as a redelivering broker would."""

    def __init__(self, app, report: bool = False):
        self.app = app
        self.report = report
        self.copies = 0
        self.failures = 0
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def install(self) -> "DuplicatePublisher":
        from celery import signals

        signals.before_task_publish.connect(self._on_publish, weak=False)
        return self

    def uninstall(self, timeout: float = 10.0) -> None:
        from celery import signals

        signals.before_task_publish.disconnect(self._on_publish)
        for t in list(self._threads):
            t.join(timeout)

    def _on_publish(self, sender=None, body=None, exchange=None, routing_key=None, headers=None, properties=None,
                    declare=None, retry_policy=None, **_kwargs) -> None:
        message = copy.deepcopy((body, exchange, routing_key, headers, properties))
        start = threading.Event()
        t = threading.Thread(target=self._publish_copy, args=(sender, message, declare, start), daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        start.wait(1)  # the copy is on its way as the original is published

    def _publish_copy(self, task_name, message, declare, start: threading.Event) -> None:
        body, exchange, routing_key, headers, properties = message
        try:
            with self.app.producer_pool.acquire(block=True, timeout=10) as producer:
                start.set()
                producer.publish(body, exchange=exchange, routing_key=routing_key, serializer="json",
                                 headers=headers, declare=declare, delivery_mode=2, retry=True,
                                 retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                                 **properties)
            with self._lock:
                self.copies += 1
            if self.report:
                print(f"fault.duplicate.published task={task_name}", file=sys.__stderr__, flush=True)
        except Exception as exc:  # noqa: BLE001 - a lost copy is reported, not fatal
            start.set()
            with self._lock:
                self.failures += 1
            print(f"fault.duplicate.failed task={task_name} error={exc!r}", file=sys.__stderr__, flush=True)


# --- Inside a batch ----------------------------------------------------------------------------

SLOWDOWN_SQL = """
CREATE TABLE IF NOT EXISTS fault_knobs (name text PRIMARY KEY, value double precision NOT NULL);
CREATE OR REPLACE FUNCTION fault_pause() RETURNS void LANGUAGE plpgsql AS $$
DECLARE pause double precision;
BEGIN
  -- Once per transaction, so a batch sleeps once whatever it touches.
  IF coalesce(current_setting('fault.paused', true), '') = '' THEN
    PERFORM set_config('fault.paused', '1', true);
    SELECT value INTO pause FROM fault_knobs WHERE name = 'batch_sleep';
    IF pause IS NOT NULL AND pause > 0 THEN
      PERFORM pg_sleep(pause * (0.5 + random()));
    END IF;
  END IF;
END $$;
CREATE OR REPLACE FUNCTION fault_slow_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM fault_pause(); RETURN NULL; END $$;
-- A learner batch: the UPDATE that restarts the learners' attempts.
DROP TRIGGER IF EXISTS fault_slow_learner_batch ON course_assignments;
CREATE TRIGGER fault_slow_learner_batch AFTER UPDATE ON course_assignments FOR EACH ROW
  WHEN (NEW.last_reset_job_id IS DISTINCT FROM OLD.last_reset_job_id) EXECUTE FUNCTION fault_slow_batch();
-- A purge step: its DELETE of lesson rows.
DROP TRIGGER IF EXISTS fault_slow_purge_step ON lesson_progress;
CREATE TRIGGER fault_slow_purge_step AFTER DELETE ON lesson_progress
  FOR EACH STATEMENT EXECUTE FUNCTION fault_slow_batch();
"""


def run_sql(url: str, statements: str | list[str], params: dict | None = None) -> list:
    """Run statements on their own autocommit connection; returns the last one's rows."""
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            rows: list = []
            for statement in [statements] if isinstance(statements, str) else statements:
                result = conn.exec_driver_sql(statement, params) if params else conn.exec_driver_sql(statement)
                if result.returns_rows:
                    rows = result.all()
            return rows
    finally:
        engine.dispose()


def install_batch_slowdown(db_url: str, seconds: float) -> None:
    """Every learner batch (after restarting its first learner's attempt) and every purge step
    (after deleting its lesson rows) sleeps ``seconds`` (x0.5..1.5) inside its transaction: a kill
    or a terminated connection then lands in an open, half-done batch."""
    run_sql(db_url, SLOWDOWN_SQL)
    set_batch_slowdown(db_url, seconds)


def set_batch_slowdown(db_url: str, seconds: float) -> None:
    run_sql(db_url, "INSERT INTO fault_knobs (name, value) VALUES ('batch_sleep', %(v)s) "
                 "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", {"v": float(seconds)})


def install_assignment_poison(db_url: str, user_id: int, course_id: int) -> str:
    """A row trigger that makes every restart of this learner's attempt in the course fail (a learner
    whose rows break their batch, every time); returns the error message it raises."""
    message = f"poisoned learner {int(user_id)} (fault injection)"
    run_sql(db_url, [
        "CREATE OR REPLACE FUNCTION fault_poison_assignment() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION '{message}'; END $$",
        "CREATE TRIGGER fault_poison_assignment BEFORE UPDATE ON course_assignments FOR EACH ROW "
        f"WHEN (OLD.user_id = {int(user_id)} AND OLD.course_id = {int(course_id)} AND NEW.attempt <> OLD.attempt) "
        "EXECUTE FUNCTION fault_poison_assignment()",
    ])
    return message


def install_poison(db_url: str, user_id: int, table: str = "assessment_results") -> str:
    """A row trigger that makes every DELETE of ``user_id``'s rows in ``table`` fail; returns the message."""
    message = f"poisoned learner {int(user_id)} (fault injection)"
    run_sql(db_url, [
        "CREATE OR REPLACE FUNCTION fault_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF OLD.user_id = {int(user_id)} THEN RAISE EXCEPTION '{message}'; END IF; RETURN OLD; END $$",
        f"CREATE TRIGGER fault_poison BEFORE DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION fault_poison()",
    ])
    return message


@dataclass(frozen=True)
class Backend:
    """A connection of the test database that is inside a batch transaction (sleeping in it)."""

    pid: int
    client_port: int
    xact_start: datetime
    kind: str  # learners | purge


def _admin_url(db_url: str) -> str:
    return make_url(db_url).set(database="postgres").render_as_string(hide_password=False)


def backends_inside_batch(db_url: str) -> list[Backend]:
    """This database's connections sleeping inside a batch; ``kind`` is read from the statement
    (a learner batch restarts attempts in ``course_assignments``, a purge step deletes lesson rows)."""
    rows = run_sql(_admin_url(db_url), "SELECT pid, client_port, xact_start, query FROM pg_stat_activity "
                                    "WHERE datname = %(db)s AND wait_event = 'PgSleep' AND client_port IS NOT NULL",
                {"db": make_url(db_url).database})
    return [Backend(int(pid), int(port), xact_start, "learners" if "course_assignments" in (query or "") else "purge")
            for pid, port, xact_start, query in rows]


def transaction_still_open(db_url: str, backend: Backend) -> bool:
    """True while ``backend`` is still in the transaction it was seen in."""
    rows = run_sql(_admin_url(db_url), "SELECT xact_start FROM pg_stat_activity WHERE pid = %(pid)s",
                {"pid": backend.pid})
    return bool(rows) and rows[0][0] == backend.xact_start


def _socket_inodes_by_local_port() -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            port = int(parts[1].rsplit(":", 1)[1], 16)
            found.setdefault(port, set()).add(parts[9])
    return found


def pids_owning_ports(ports: set[int], candidates: list[int]) -> dict[int, int]:
    """``{client port: process id}`` for the ``candidates`` holding a TCP socket with that local port."""
    by_port = _socket_inodes_by_local_port()
    wanted = {inode: port for port in ports for inode in by_port.get(port, ())}
    owners: dict[int, int] = {}
    for pid in candidates:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in wanted:
                owners[wanted[target[8:-1]]] = pid
    return owners


def pids_inside_batch(db_url: str, worker: CeleryProcess) -> dict[int, Backend]:
    """``{pool process id: its backend}`` for the worker's processes inside a batch transaction now."""
    backends = backends_inside_batch(db_url)
    if not backends:
        return {}
    owners = pids_owning_ports({b.client_port for b in backends}, worker.children())
    return {owners[b.client_port]: b for b in backends if b.client_port in owners}


def process_gone(pid: int) -> bool:
    """Dead (reaped, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith(("Z", "X"))
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True  # gone, or reaped between opening its stat file and reading it (ESRCH)


def terminate_batch_backends(db_url: str) -> int:
    """``pg_terminate_backend`` every connection of this database (and only it) that is inside a batch."""
    pids = [b.pid for b in backends_inside_batch(db_url)]
    if not pids:
        return 0
    rows = run_sql(_admin_url(db_url), "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                                    "FROM pg_stat_activity WHERE datname = %(db)s AND pid = ANY(%(pids)s)",
                {"db": make_url(db_url).database, "pids": pids})
    return int(rows[0][0])


def terminate_all_backends(db_url: str) -> int:
    """``pg_terminate_backend`` every other connection to this database (idle pooled ones too)."""
    rows = run_sql(_admin_url(db_url), "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                                    "FROM pg_stat_activity WHERE datname = %(db)s AND pid <> pg_backend_pid()",
                {"db": make_url(db_url).database})
    return int(rows[0][0])


# --- Job progress and the pass criterion -------------------------------------------------------

def job_status(job_id: str) -> dict:
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        return resets.status(session, job_id)


def wait_for_job(job_id: str, timeout: float = 90.0, states=("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = job_status(job_id)
        except Exception:  # noqa: BLE001 - the database may be restarting under the test
            st = {"state": "unknown"}
        if st["state"] in states:
            return st
        if time.monotonic() > deadline:
            unfinished = [tuple(r) for r in batch_rows(job_id) if r.state not in ("done", "dead", "cancelled")]
            raise AssertionError(f"job {job_id} still {st.get('state')} after {timeout:.0f}s: {st}; "
                                 f"unfinished batches: {unfinished}")
        time.sleep(0.1)


def wait_for_progress(job_id: str, batches_done: int, timeout: float = 60.0) -> dict:
    """Until at least ``batches_done`` batches of the job are done."""
    def done_enough():
        st = job_status(job_id)
        return st if st["batches_done"] >= batches_done else None

    return wait_until(done_enough, timeout, what=f"{batches_done} batches of job {job_id} done")


def wait_for_notifications(job_id: str, timeout: float = 60.0) -> dict:
    """Until no notification of the job is pending or being sent."""
    def settled():
        st = job_status(job_id)
        return st if st["notifications"]["pending"] == 0 else None

    return wait_until(settled, timeout, interval=0.1, what=f"notifications of job {job_id}")


def console_deliveries(path: str | Path) -> Counter:
    """Deliveries per notification id in the console backend's output (one JSON line each)."""
    counts: Counter = Counter()
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        if line.strip():
            counts[json.loads(line)["notification_id"]] += 1
    return counts


class DeliveredTwice(AssertionError):
    """A notification reached the provider more than once."""


def assert_notifications_delivered_once(session, job_id: str, console_path: str | Path) -> int:
    """Every notification row of the job was sent, and delivered exactly once (its line appears once)."""
    from models.schema import Notification

    n = Notification.__table__.c
    rows = session.execute(select(n.id, n.status).where(n.reset_job_id == uuid.UUID(job_id))).all()
    deliveries = console_deliveries(console_path)
    not_sent = [(i, s) for i, s in rows if s != "sent"]
    assert not not_sent, f"{len(not_sent)} notifications not sent, e.g. {not_sent[:5]}"
    missing = {i for i, _ in rows} - set(deliveries)
    assert not missing, f"{len(missing)} sent notifications never delivered, e.g. {sorted(missing)[:5]}"
    twice = {i: c for i, c in deliveries.items() if c > 1}
    if twice:
        raise DeliveredTwice(f"{len(twice)} notifications delivered more than once: {dict(list(twice.items())[:5])}")
    return len(rows)


def assert_outcome(before, job_id: str, course_id: int, reset_ids: set[int], console_path: str | Path,
                   state: str = "succeeded") -> dict:
    """The pass criterion: final state; each targeted learner reset exactly once by this job and
    nothing else touched; analytics equal to a recomputation; one notification row per notifiable
    learner and exactly one delivery of each. Returns the job's status."""
    from models.db import session_scope
    from tests.reset_checks import assert_reset_exact

    st = job_status(job_id)
    assert st["state"] == state, st
    assert st["learners_done"] == len(reset_ids), (st["learners_done"], len(reset_ids))
    wait_for_notifications(job_id)
    with session_scope() as session:
        assert_reset_exact(session, before, job_id, course_id, reset_ids)
        assert_notifications_delivered_once(session, job_id, console_path)
    return st


def batch_rows(job_id: str) -> list:
    from models.db import session_scope
    from models.schema import ResetBatch

    b = ResetBatch.__table__.c
    with session_scope() as session:
        return session.execute(select(b.batch_no, b.kind, b.state, b.attempts, b.lo_user_id, b.hi_user_id,
                                      b.cursor_row_id, b.hi_row_id, b.learners_reset, b.error, b.claimed_at,
                                      b.lease_expires_at, b.finished_at)
                               .where(b.job_id == uuid.UUID(job_id)).order_by(b.batch_no)).all()


def finished_at(job_id: str) -> datetime:
    from models.db import session_scope
    from models.schema import ResetJob

    with session_scope() as session:
        value = session.scalar(select(ResetJob.finished_at).where(ResetJob.id == uuid.UUID(job_id)))
    assert value is not None, f"job {job_id} has not finished"
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# --- Recovery times ----------------------------------------------------------------------------

@dataclass
class Recovery:
    """Fault -> job end, per scenario (printed at the end of the module and optionally saved)."""

    rows: dict[str, dict] = field(default_factory=dict)

    def record(self, scenario: str, fault_at: datetime, job_id: str, bound: float, **extra) -> float:
        seconds = (finished_at(job_id) - fault_at).total_seconds()
        self.rows[scenario] = {"recovery_seconds": round(seconds, 2), "bound_seconds": bound, **extra}
        assert seconds <= bound, f"{scenario}: recovered in {seconds:.1f}s, bound {bound}s"
        return seconds

    def duration(self, scenario: str, job_id: str, bound: float, **extra) -> float:
        """For scenarios without a single fault instant: the job's own duration (start -> end)."""
        from models.db import session_scope
        from models.schema import ResetJob

        with session_scope() as session:
            job = session.get(ResetJob, uuid.UUID(job_id))
            seconds = (job.finished_at - job.started_at).total_seconds()
        self.rows[scenario] = {"job_seconds": round(seconds, 2), "bound_seconds": bound, **extra}
        assert seconds <= bound, f"{scenario}: job took {seconds:.1f}s, bound {bound}s"
        return seconds

    def table(self) -> str:
        lines = [f"{'scenario':66} {'recovery s':>10} {'job s':>7} {'bound s':>8}  details"]
        plain = ("recovery_seconds", "job_seconds", "bound_seconds")
        for name, row in self.rows.items():
            details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in plain)
            lines.append(f"{name:66} {row.get('recovery_seconds', '-'):>10} {row.get('job_seconds', '-'):>7} "
                         f"{row['bound_seconds']:>8}  {details}")
        return "\n".join(lines)


# --- Webhooks (scenario 11) ---------------------------------------------------------------------

def subscribe_receiver(organization_id: int, receiver, events: list[str]) -> int:
    """Register ``receiver`` (tests.webhook_support.Receiver) for ``events``; returns the endpoint id."""
    from models.db import session_scope
    from producer import webhooks

    with session_scope() as session:
        created = webhooks.create_endpoint(session, organization_id, receiver.url, events)
    receiver.secrets = [created["secret"]]
    return created["id"]


def webhook_deliveries(endpoint_id: int) -> list:
    """The endpoint's delivery rows with their event type, oldest first."""
    from models.db import session_scope
    from models.schema import WebhookDelivery, WebhookEvent

    d, ev = WebhookDelivery.__table__.c, WebhookEvent.__table__.c
    with session_scope() as session:
        return session.execute(
            select(d.id, d.event_id, ev.type, d.status, d.attempts, d.delivered_at)
            .join(WebhookEvent.__table__, ev.id == d.event_id).where(d.endpoint_id == endpoint_id).order_by(d.id)
        ).all()
