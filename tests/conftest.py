"""Test fixtures: real PostgreSQL and Redis, one database and one Redis DB per test process.

Isolation (see docs/decisions/0001-embedded-default-and-test-isolation.md):

- ``template_db_url`` migrates ``pr_t<pid>_tmpl`` once; ``db_url`` (``pr_t<pid>``)
  and every ``fresh_db()`` are copies of it (``CREATE DATABASE ... TEMPLATE``),
  dropped at the end.
- ``db_session`` runs each test inside an outer transaction that is rolled back
  (SQLAlchemy's "join a Session into an external transaction" recipe), so plain
  functions are tested against real PostgreSQL without leaking rows.
- Tests whose worker processes commit get their own database from ``fresh_db()``.
- ``redis_url`` is one Redis DB number per test process, flushed at start and end.
- The whole session runs with ``PROGRESS_RESET_DATA_DIR`` in a temporary folder,
  so nothing touches the developer's ``./data``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from models.queues import QUEUES

from tests.services import ServicesUnavailable, ensure_services, refresh_configuration
from workers.processes import CeleryProcess, start_celery

REPO_ROOT = Path(__file__).resolve().parent.parent
DB_PREFIX = f"pr_t{os.getpid()}"
WORKER_READY_SECONDS = 30.0
WORKER_READY_PATTERN = r"\bready\.\s*$"
DEFAULT_QUEUES = ",".join(QUEUES)

_session_data_dir: str | None = None


# -- pytest hooks -------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    global _session_data_dir
    config.addinivalue_line("markers", "e2e: runs real worker processes against PostgreSQL and Redis")
    config.addinivalue_line("markers", "slow: larger variants (part of every run; -m 'not slow' leaves them out)")
    if _session_data_dir is None:
        _session_data_dir = tempfile.mkdtemp(prefix="progress-reset-tests-")
        os.environ["PROGRESS_RESET_DATA_DIR"] = _session_data_dir
        from models.settings import reset_settings_cache

        reset_settings_cache()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session_data_dir is not None:
        shutil.rmtree(_session_data_dir, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    # Keep each phase's report on the item, so fixtures can tell at teardown whether the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


# -- PostgreSQL ---------------------------------------------------------------------------------

def _admin_engine(admin_url: str) -> Engine:
    return create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def _url_for(admin_url: str, database: str) -> str:
    return make_url(admin_url).set(database=database).render_as_string(hide_password=False)


def _drop_database(admin_url: str, name: str) -> None:
    """Drop ``name`` after ending the connections still open to it (leftover pools, killed workers)."""
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        engine.dispose()


def _create_database(admin_url: str, name: str, template: str | None = None) -> str:
    _drop_database(admin_url, name)
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            clause = f' TEMPLATE "{template}"' if template else ""
            conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    finally:
        engine.dispose()
    return _url_for(admin_url, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_stale_test_databases(admin_url: str) -> None:
    """Drop databases left by test processes of this machine that died without cleaning up."""
    if make_url(admin_url).host not in {None, "127.0.0.1", "localhost", "::1"}:
        return
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            names = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'pr\\_t%'")).scalars().all()
    finally:
        engine.dispose()
    for name in names:
        match = re.fullmatch(r"pr_t(\d+)(_\w+)?", name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _drop_database(admin_url, name)


@pytest.fixture(scope="session")
def admin_db_url() -> str:
    """The PostgreSQL admin URL (``TEST_DATABASE_ADMIN_URL``), once the services answer."""
    try:
        url, _redis = ensure_services()
    except ServicesUnavailable as exc:
        pytest.exit(f"the tests need PostgreSQL and Redis: {exc}", returncode=2)
    _drop_stale_test_databases(url)
    return url


@pytest.fixture(scope="session")
def template_db_url(admin_db_url: str) -> Iterator[str]:
    """A migrated database, ``pr_t<pid>_tmpl``, that every test database is copied from."""
    from models.migrate import upgrade

    name = f"{DB_PREFIX}_tmpl"
    url = _create_database(admin_db_url, name)
    upgrade(url)
    yield url
    _drop_database(admin_db_url, name)


@pytest.fixture(scope="session")
def db_url(admin_db_url: str, template_db_url: str) -> Iterator[str]:
    """The session's database, ``pr_t<pid>``: migrated, shared by ``db_session`` tests."""
    name = DB_PREFIX
    url = _create_database(admin_db_url, name, template=make_url(template_db_url).database)
    yield url
    _drop_database(admin_db_url, name)


@pytest.fixture(scope="session")
def engine(db_url: str) -> Iterator[Engine]:
    from models.db import make_engine

    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def db_session(engine: Engine) -> Iterator[Session]:
    """A Session inside an outer transaction that is rolled back after the test.

    Code under test may flush and even commit: with ``create_savepoint`` a
    commit only releases a savepoint, and the outer rollback undoes everything.
    """
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        if outer.is_active:
            outer.rollback()
        connection.close()


@pytest.fixture
def fresh_db(admin_db_url: str, template_db_url: str) -> Iterator[Callable[[], str]]:
    """Factory: ``fresh_db()`` -> URL of a brand-new migrated database, dropped at teardown.

    For tests where other processes (workers, the CLI) commit.
    """
    template = make_url(template_db_url).database
    made: list[str] = []

    def make() -> str:
        name = f"{DB_PREFIX}_f{next(_fresh_counter)}"
        made.append(name)
        return _create_database(admin_db_url, name, template=template)

    yield make
    from models.db import dispose_engine

    dispose_engine()  # the process's engine may still hold connections to one of them
    for name in made:
        _drop_database(admin_db_url, name)


_fresh_counter = itertools.count(1)


# -- Redis --------------------------------------------------------------------------------------

REDIS_CLAIM_KEY = "progress_reset:tests:redis_db:{n}"
REDIS_CLAIM_SECONDS = 12 * 3600
# Take over a claim only if it still holds the dead owner's pid (atomic compare-and-set).
_STEAL_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def _claim_redis_db(base_url: str) -> int | None:
    """Claim a Redis DB number (1-15) no other live test process on this machine uses.

    Starts at ``1 + pid % 15`` and moves on while a number is claimed by a
    process that is still running; the claims are keys in DB 0. Returns None
    when all fifteen are taken.
    """
    import redis

    local = urlsplit(base_url).hostname in {None, "127.0.0.1", "localhost", "::1"}
    registry = redis.Redis.from_url(f"{base_url}/0")
    me = str(os.getpid())
    try:
        for i in range(15):
            n = 1 + (os.getpid() + i) % 15
            key = REDIS_CLAIM_KEY.format(n=n)
            if registry.set(key, me, nx=True, ex=REDIS_CLAIM_SECONDS):
                return n
            holder = registry.get(key)
            if holder is None:
                continue
            holder = holder.decode()
            if holder == me:
                return n
            if local and holder.isdigit() and not _pid_alive(int(holder)):
                if registry.eval(_STEAL_CLAIM, 1, key, holder, me, REDIS_CLAIM_SECONDS):
                    return n
        return None
    finally:
        registry.close()


def _release_redis_db(base_url: str, n: int) -> None:
    import redis

    registry = redis.Redis.from_url(f"{base_url}/0")
    try:
        key = REDIS_CLAIM_KEY.format(n=n)
        if registry.get(key) == str(os.getpid()).encode():
            registry.delete(key)
    finally:
        registry.close()


@pytest.fixture(scope="session")
def redis_url(admin_db_url: str) -> Iterator[str]:
    """``redis://host:port/<n>``: this process's own Redis DB, flushed at start and end.

    ``n`` is ``TEST_REDIS_DB`` when set; otherwise ``1 + pid % 15``, or the next
    number not claimed by another running test process (DB 0 is left to development).
    """
    import redis

    from tests.services import redis_base_url

    base = redis_base_url()
    explicit = os.environ.get("TEST_REDIS_DB")
    number = int(explicit) if explicit else _claim_redis_db(base)
    if number is None:
        pytest.exit("all Redis DBs 1-15 are claimed by other running test processes; "
                    "wait for one to finish or set TEST_REDIS_DB", returncode=2)
    url = f"{base}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        if not explicit:
            _release_redis_db(base, number)


# -- RabbitMQ -----------------------------------------------------------------------------------

_vhost_counter = itertools.count(1)


@pytest.fixture(scope="session")
def rabbitmq_server(admin_db_url: str) -> str:
    """The RabbitMQ server URL (``TEST_RABBITMQ_URL``), once it answers; stale test vhosts deleted."""
    from tests import rabbitmq_support as rmq
    from tests.services import ensure_rabbitmq

    try:
        url = ensure_rabbitmq()
    except ServicesUnavailable as exc:
        pytest.exit(f"the tests need RabbitMQ: {exc}", returncode=2)
    if rmq.local_url(url):
        rmq.delete_stale_vhosts(_pid_alive)
    return url


@pytest.fixture
def rabbitmq_vhost(rabbitmq_server: str) -> Iterator[Callable[[], str]]:
    """Factory: ``rabbitmq_vhost()`` -> ``amqp://.../pr_t<pid>_v<n>``, a virtual host of its own on the
    shared server (queues, exchanges and messages of nobody else), deleted at teardown."""
    from tests import rabbitmq_support as rmq

    made: list[str] = []

    def make() -> str:
        if not rmq.local_url(rabbitmq_server):
            pytest.skip("RabbitMQ is not local: its virtual hosts cannot be made here")
        name = f"{rmq.VHOST_PREFIX}_v{next(_vhost_counter)}"
        rmq.delete_vhost(name)
        rmq.create_vhost(name, user=urlsplit(rabbitmq_server).username or "guest")
        made.append(name)
        return rmq.with_vhost(rabbitmq_server, name)

    yield make
    for name in made:
        rmq.delete_vhost(name)


# -- Environment --------------------------------------------------------------------------------

@pytest.fixture
def use_env() -> Iterator[Callable[..., dict[str, str]]]:
    """Factory: ``use_env(DATABASE_URL=..., CELERY_BROKER_URL=..., **more)`` for this test.

    Sets the variables in this process (``None`` removes one), re-reads the
    settings, disposes the engine and reconfigures the Celery app; all undone at
    teardown. Returns the environment a subprocess should get (``os.environ``
    with the changes).
    """
    with pytest.MonkeyPatch.context() as patch:

        def apply(**values: object) -> dict[str, str]:
            for key, value in values.items():
                if value is None:
                    patch.delenv(key, raising=False)
                else:
                    patch.setenv(key, str(value))
            refresh_configuration()
            return dict(os.environ)

        yield apply
    refresh_configuration()


# -- Worker processes ---------------------------------------------------------------------------

WorkerProcess = CeleryProcess  # the handle celery_worker_proc returns


@pytest.fixture
def celery_worker_proc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``celery_worker_proc(env, queues=..., concurrency=2, name="w1")`` -> a ready worker.

    Starts ``python -m celery -A workers worker`` (prefork, without mingle and
    gossip) in the repository root with ``env`` merged over ``os.environ``,
    logs to a file in ``tmp_path``, and waits until it says it is ready.
    Every worker it started is stopped at teardown.
    """
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | None = None, queues: str = DEFAULT_QUEUES, concurrency: int = 2,
              name: str = "w1") -> WorkerProcess:
        worker = start_celery(
            ["worker", "-Q", queues, "-c", str(concurrency), "-P", "prefork", "-n", f"{name}@%h",
             "--without-mingle", "--without-gossip", "-l", "info"],
            env=env, log_path=tmp_path / f"worker-{name}-{len(started)}.log", name=name, cwd=REPO_ROOT,
            ready_pattern=WORKER_READY_PATTERN, ready_timeout=WORKER_READY_SECONDS,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        # Shown under "Captured stdout teardown" of the failed test.
        for worker in started:
            print(f"--- worker {worker.name} (pid {worker.pid}) log tail, {worker.log_path} ---")
            print(worker.log_tail(80))
