"""Make sure the PostgreSQL, Redis and RabbitMQ the tests run against are there.

Used by the test fixtures and by ``make test`` (``python -m tests.services``).
For each service, in order:

1. use it at the configured URL when it answers
   (``TEST_DATABASE_ADMIN_URL``, ``TEST_REDIS_URL``, ``TEST_RABBITMQ_URL``);
2. otherwise start a local one from the installed binaries
   (``pg_ctlcluster`` for the Debian PostgreSQL cluster, ``redis-server``,
   ``rabbitmq-server -detached``);
3. otherwise, as root with ``apt-get``, install the Debian packages
   ``postgresql``, ``redis-server`` and ``rabbitmq-server`` and start them;
4. otherwise stop with one message that says exactly what is missing.

PgBouncer is not a shared server: :func:`start_pgbouncer` starts one on a free port, with its
own configuration, in front of the test PostgreSQL for the test that needs it; the binary comes
from the Debian package ``pgbouncer``, installed the same way when missing (:func:`ensure_pgbouncer`).

It also points this process at another database or broker
(:func:`refresh_configuration`); Celery processes are started with
:mod:`workers.processes`, the launcher the demo and the benchmark use too.

Only local URLs (127.0.0.1 / localhost) are started or installed; a remote
server that does not answer is reported, never worked around.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
WAIT_SECONDS = 30.0
APT_PACKAGES = {"postgresql": "postgresql", "redis": "redis-server", "rabbitmq": "rabbitmq-server"}
URL_VARIABLES = {"postgresql": "TEST_DATABASE_ADMIN_URL", "redis": "TEST_REDIS_URL", "rabbitmq": "TEST_RABBITMQ_URL"}


class ServicesUnavailable(RuntimeError):
    """A service the tests need does not answer and could not be started."""


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str = ""
    # The server answered but refused us (authentication): starting it again will not help.
    refused: bool = False


def admin_db_url() -> str:
    """The PostgreSQL URL tests create and drop their databases through."""
    return os.environ.get("TEST_DATABASE_ADMIN_URL") or DEFAULT_ADMIN_URL


def redis_base_url() -> str:
    """The Redis server URL, without a database number."""
    return (os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS_URL).rstrip("/")


def _is_local(host: str | None) -> bool:
    return (host or "127.0.0.1") in LOCAL_HOSTS


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# -- PostgreSQL ---------------------------------------------------------------------------------

def _pg_conninfo(url: str) -> dict:
    u = make_url(url)
    info = {"host": u.host or "127.0.0.1", "port": u.port or 5432, "user": u.username or "postgres",
            "dbname": u.database or "postgres", "connect_timeout": 3}
    if u.password:
        info["password"] = u.password
    return info


def probe_postgres(url: str) -> Probe:
    import psycopg

    try:
        with psycopg.connect(**_pg_conninfo(url), autocommit=True) as conn:
            conn.execute("SELECT 1")
        return Probe(True)
    except psycopg.OperationalError as exc:
        text = str(exc)
        refused = "authentication failed" in text or "pg_hba.conf" in text or "does not exist" in text
        return Probe(False, _one_line(exc), refused=refused)


def _pg_clusters() -> list[str]:
    root = Path("/etc/postgresql")
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if (p / "main").is_dir()), key=lambda v: float(v) if
                  v.replace(".", "", 1).isdigit() else 0.0)


def _start_postgres(_url: str) -> str | None:
    """Start the local Debian cluster; returns what is missing, or None when started."""
    if shutil.which("pg_ctlcluster") is None:
        return "pg_ctlcluster is not on PATH (the PostgreSQL server is not installed)"
    versions = _pg_clusters()
    if not versions:
        return "no PostgreSQL cluster under /etc/postgresql/<version>/main"
    version = versions[-1]
    print(f"services: starting PostgreSQL {version}/main with pg_ctlcluster", file=sys.stderr)
    run = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "already running" not in (run.stderr + run.stdout):
        return f"pg_ctlcluster {version} main start failed: {_one_line(run.stderr or run.stdout)}"
    return None


def _trust_local_connections() -> None:
    """Let the local ``postgres`` role in over TCP without a password.

    Only called for a cluster this script has just installed: Debian's default
    asks for a password the fresh ``postgres`` role does not have.
    """
    for version in _pg_clusters():
        hba = Path("/etc/postgresql") / version / "main" / "pg_hba.conf"
        lines = "host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
        text = hba.read_text()
        if lines not in text:
            hba.write_text(lines + text)
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "reload"],
                       capture_output=True, timeout=60)


# -- Redis --------------------------------------------------------------------------------------

def probe_redis(url: str) -> Probe:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
        return Probe(True)
    except redis.AuthenticationError as exc:
        return Probe(False, _one_line(exc), refused=True)
    except redis.RedisError as exc:
        return Probe(False, _one_line(exc))


def _start_redis(url: str) -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (the Redis server is not installed)"
    port = urlsplit(url).port or 6379
    print(f"services: starting redis-server on 127.0.0.1:{port}", file=sys.stderr)
    run = subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
                          "--save", "", "--appendonly", "no"], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        return f"redis-server failed to start: {_one_line(run.stderr or run.stdout)}"
    return None


# -- RabbitMQ -----------------------------------------------------------------------------------

def rabbitmq_base_url() -> str:
    """The RabbitMQ URL (``TEST_RABBITMQ_URL``); tests use a virtual host of their own on that server."""
    return os.environ.get("TEST_RABBITMQ_URL") or DEFAULT_RABBITMQ_URL


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def probe_rabbitmq(url: str) -> Probe:
    import amqp
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        return Probe(True)
    except amqp.exceptions.AccessRefused as exc:
        return Probe(False, _one_line(exc), refused=True)
    except Exception as exc:  # noqa: BLE001 - refused, reset, timed out: all "does not answer"
        refused = "ACCESS_REFUSED" in str(exc) or "NOT_ALLOWED" in str(exc)
        return Probe(False, _one_line(exc), refused=refused)


def _start_rabbitmq(url: str) -> str | None:
    """``rabbitmq-server -detached`` (the Debian package's node, run as its own user)."""
    if shutil.which("rabbitmq-server") is None:
        return "rabbitmq-server is not on PATH (the RabbitMQ server is not installed)"
    port = urlsplit(url).port or 5672
    print(f"services: starting rabbitmq-server on port {port}", file=sys.stderr)
    env = dict(os.environ, RABBITMQ_NODE_PORT=str(port))
    run = subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, text=True, env=env, timeout=120)
    if run.returncode != 0:
        return f"rabbitmq-server -detached failed: {_one_line(run.stderr or run.stdout)}"
    return None


def ensure_rabbitmq(allow_install: bool = True) -> str:
    """Make RabbitMQ answer (as :func:`ensure_services` does for the others); returns its URL."""
    url = rabbitmq_base_url()
    problem = _ensure_one("rabbitmq", url, probe_rabbitmq, _start_rabbitmq, set(), allow_install)
    if problem is not None:
        raise ServicesUnavailable(problem)
    return url


# -- Orchestration ------------------------------------------------------------------------------

def _can_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install(packages: list[str]) -> str | None:
    print(f"services: installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if run.returncode != 0:
            return f"{' '.join(argv[:2])} failed: {_one_line(run.stderr or run.stdout)}"
    return None


def _wait(probe, url: str, seconds: float = WAIT_SECONDS) -> Probe:
    deadline = time.monotonic() + seconds
    result = probe(url)
    while not result.ok and not result.refused and time.monotonic() < deadline:
        time.sleep(0.5)
        result = probe(url)
    return result


def _ensure_one(name: str, url: str, probe, start, installed: set[str], allow_install: bool) -> str | None:
    """Make one service answer; returns a description of what is missing, or None."""
    shown = make_url(url).render_as_string(hide_password=True) if name == "postgresql" else _hide_password(url)
    first = probe(url)
    if first.ok:
        return None
    if first.refused:
        if name == "postgresql" and name in installed:
            _trust_local_connections()
            if _wait(probe, url).ok:
                return None
        return f"{name} at {shown} answers but refuses the connection ({first.reason}); " \
               f"fix the credentials in {URL_VARIABLES[name]}"
    host = make_url(url).host if name == "postgresql" else urlsplit(url).hostname
    if not _is_local(host):
        return f"{name} at {shown} does not answer ({first.reason}); it is not local, so it is not started here"
    missing = start(url)
    if missing is not None and allow_install and _can_install():
        failure = _apt_install([APT_PACKAGES[name]])
        if failure is not None:
            return f"{name} at {shown} does not answer and could not be installed ({failure})"
        installed.add(name)
        missing = start(url)
    if missing is not None:
        how = "" if allow_install and _can_install() else "; installing is not possible here (needs root and apt-get)"
        return f"{name} at {shown} does not answer ({first.reason}) and cannot be started: {missing}{how}; " \
               f"install the Debian package {APT_PACKAGES[name]!r} or point " \
               f"{URL_VARIABLES[name]} at a running server"
    result = _wait(probe, url)
    if result.refused and name == "postgresql" and name in installed:
        _trust_local_connections()
        result = _wait(probe, url)
    if not result.ok:
        return f"{name} at {shown} was started but does not answer within {WAIT_SECONDS:.0f}s ({result.reason})"
    return None


def ensure_services(allow_install: bool = True) -> tuple[str, str]:
    """Make PostgreSQL and Redis answer; returns ``(admin_db_url, redis_base_url)``.

    Safe to call any number of times; raises :class:`ServicesUnavailable` with
    one message naming everything that is missing.
    """
    installed: set[str] = set()
    pg_url, redis_url = admin_db_url(), redis_base_url()
    problems = [
        problem
        for problem in (
            _ensure_one("postgresql", pg_url, probe_postgres, _start_postgres, installed, allow_install),
            _ensure_one("redis", redis_url, probe_redis, _start_redis, installed, allow_install),
        )
        if problem is not None
    ]
    if problems:
        raise ServicesUnavailable("; ".join(problems))
    return pg_url, redis_url


# -- PgBouncer ----------------------------------------------------------------------------------
#
# Not a server the tests share: each test that needs one starts its own PgBouncer (a free port,
# its own configuration in a temporary folder) in front of the test PostgreSQL, and stops it.

PGBOUNCER_PACKAGE = "pgbouncer"
PGBOUNCER_USER = "nobody"  # PgBouncer refuses to run as root; as root it is started as this user


def pgbouncer_binary() -> str | None:
    """The ``pgbouncer`` executable (Debian puts it in /usr/sbin, outside a user's PATH)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def ensure_pgbouncer(allow_install: bool = True) -> str:
    """The ``pgbouncer`` executable, installing the Debian package as root when it is missing.

    Raises :class:`ServicesUnavailable` with one message when it is missing and cannot be installed.
    """
    binary = pgbouncer_binary()
    if binary is None and allow_install and _can_install():
        failure = _apt_install([PGBOUNCER_PACKAGE])
        if failure is not None:
            raise ServicesUnavailable(f"pgbouncer is not installed and could not be installed ({failure})")
        binary = pgbouncer_binary()
    if binary is None:
        raise ServicesUnavailable(f"pgbouncer is not installed and installing is not possible here (needs root "
                                  f"and apt-get); install the Debian package {PGBOUNCER_PACKAGE!r}")
    return binary


@dataclass
class PgBouncer:
    """A PgBouncer process this process started; :meth:`stop` ends it (by its pid)."""

    process: subprocess.Popen
    port: int
    folder: Path

    def url_for(self, database_url: str, **changes) -> str:
        """``database_url`` (same user, password and database) through this PgBouncer."""
        return make_url(database_url).set(host="127.0.0.1", port=self.port, **changes) \
            .render_as_string(hide_password=False)

    def log_text(self) -> str:
        return (self.folder / "pgbouncer.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_pgbouncer(upstream_url: str, folder: Path, *, pool_mode: str = "transaction", pool_size: int = 3,
                    users: dict[str, str] | None = None, round_robin: bool = True) -> PgBouncer:
    """Start PgBouncer on a free loopback port in front of the PostgreSQL at ``upstream_url``.

    Every database of that server is reachable through it. ``users`` (name -> password) may log
    in (default: the URL's user); PgBouncer logs them in to PostgreSQL with the same password.
    Each (database, user) pair gets at most ``pool_size`` server connections; with
    ``round_robin`` a client's consecutive transactions go to different ones, as on a busy pooler.
    """
    binary = ensure_pgbouncer()
    upstream = make_url(upstream_url)
    users = users or {upstream.username or "postgres": upstream.password or ""}
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    quoted = ['"{}" "{}"'.format(name, password.replace('"', '""')) for name, password in users.items()]
    (folder / "users.txt").write_text("\n".join(quoted) + "\n")
    (folder / "pgbouncer.ini").write_text(f"""[databases]
* = host={upstream.host or '127.0.0.1'} port={upstream.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / 'users.txt'}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
min_pool_size = {pool_size}
server_round_robin = {int(round_robin)}
max_client_conn = 500
query_wait_timeout = 60
ignore_startup_parameters = extra_float_digits,options
""")
    argv = [binary, str(folder / "pgbouncer.ini")]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv[1:1] = ["-u", PGBOUNCER_USER]  # it reads its files first, then drops to that user
    with open(folder / "pgbouncer.log", "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    bouncer = PgBouncer(process, port, folder)
    probe_url = bouncer.url_for(upstream_url)
    deadline = time.monotonic() + WAIT_SECONDS
    while not (result := probe_postgres(probe_url)).ok:
        if process.poll() is not None or time.monotonic() > deadline:
            bouncer.stop()
            raise ServicesUnavailable(f"pgbouncer on 127.0.0.1:{port} did not answer ({result.reason}); "
                                      f"log: {bouncer.log_text().strip()[-300:]}")
        time.sleep(0.2)
    return bouncer


# -- Celery processes started by tests ----------------------------------------------------------

def refresh_configuration() -> None:
    """Re-read the settings in this process and rebuild what was built from them (engine, Celery app)."""
    from workers.app import reconfigure

    reconfigure()


def main() -> int:
    try:
        pg_url, redis_url = ensure_services()
    except ServicesUnavailable as exc:
        print(f"error: the tests need PostgreSQL and Redis: {exc}", file=sys.stderr)
        return 2
    print(f"services: PostgreSQL at {make_url(pg_url).render_as_string(hide_password=True)} and "
          f"Redis at {redis_url} answer")
    try:
        rabbitmq_url = ensure_rabbitmq()
    except ServicesUnavailable as exc:
        print(f"error: the tests need RabbitMQ: {exc}", file=sys.stderr)
        return 2
    print(f"services: RabbitMQ at {_hide_password(rabbitmq_url)} answers")
    try:
        print(f"services: PgBouncer at {ensure_pgbouncer()} (each test that needs one starts its own)")
    except ServicesUnavailable as exc:
        print(f"error: the tests need PgBouncer: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
