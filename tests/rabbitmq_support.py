"""RabbitMQ for the tests: virtual hosts of this test process on the shared server, what the
broker says about its queues, throwaway RabbitMQ nodes a test may stop, kill and wipe, and
worker apps with a task that retries itself.

- Virtual hosts ``pr_t<pid>_v<n>`` are created with ``rabbitmqctl`` (root, the
  local node) and deleted at the end; those of test processes that died are deleted at the
  start, like their databases.
- :func:`queue_types` asks the broker itself (``rabbitmqctl list_queues name type``).
- :class:`RabbitMQNode`: a node of its own (``rabbitmq-server`` in the foreground as the
  ``rabbitmq`` user, its own node name, ports, data and log folders under a temporary
  folder). The shared server is never stopped or restarted.
- ``-A tests.rabbitmq_support:retrying_app``: the project's app with one more task that retries
  itself with a countdown (and ``retrying_app_as_celery_does``, without the project's publish hook).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from models.queues import QUEUES
from tests.notify_support import free_port, wait_until
from workers.rabbitmq import queue_lengths

VHOST_PREFIX = f"pr_t{os.getpid()}"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
NODE_READY_SECONDS = 60.0


class RabbitMQUnavailable(RuntimeError):
    """rabbitmqctl cannot manage the local RabbitMQ (not installed, not root, not local)."""


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """``rabbitmqctl <args>`` on the local node; its standard output."""
    if shutil.which("rabbitmqctl") is None:
        raise RabbitMQUnavailable("rabbitmqctl is not on PATH")
    run = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RabbitMQUnavailable(f"rabbitmqctl {' '.join(args)} failed: {(run.stderr or run.stdout).strip()[:500]}")
    return run.stdout


def with_vhost(url: str, vhost: str) -> str:
    """``url`` with its virtual host replaced."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


def create_vhost(name: str, user: str = "guest") -> None:
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")


def delete_vhost(name: str) -> None:
    try:
        rabbitmqctl("delete_vhost", name)
    except RabbitMQUnavailable:
        pass  # already gone


def vhosts() -> list[str]:
    return [line.strip() for line in rabbitmqctl("list_vhosts", "-q", "--no-table-headers", "name").splitlines()
            if line.strip()]


def delete_stale_vhosts(pid_alive) -> list[str]:
    """Delete the virtual hosts of test processes of this machine that died without cleaning up
    (``pid_alive(pid)`` says whether a test process is still running)."""
    stale = []
    for name in vhosts():
        match = re.fullmatch(r"pr_t(\d+)(_\w+)?", name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            delete_vhost(name)
            stale.append(name)
    return stale


def queue_types(vhost: str) -> dict[str, str]:
    """``{queue: type}`` as the broker reports them (``classic``, ``quorum``, ``stream``)."""
    out = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "type")
    return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)


def local_url(url: str) -> bool:
    return (urlsplit(url).hostname or "127.0.0.1") in {"127.0.0.1", "localhost", "::1"}


class RabbitMQNode:
    """A RabbitMQ node of the test's own on free loopback ports (``guest``/``guest``, vhost ``/``).

    ``stop()`` is a clean shutdown (durable queues and persistent messages survive it);
    ``kill()`` is ``kill -9``; ``wipe()`` (stopped) forgets everything: queues, exchanges,
    messages. It runs as the ``rabbitmq`` user when started by root, as Debian's node does.
    """

    kind = "rabbitmq"

    def __init__(self, name: str | None = None):
        self.port = free_port()
        self.dist_port = free_port()
        self.name = name or f"{VHOST_PREFIX}_n{self.port}@localhost"
        # Not under pytest's tmp_path (mode 0700, root's): the node runs as rabbitmq.
        self.dir = Path(tempfile.mkdtemp(prefix="pr-faults-rabbitmq-"))
        self.dir.chmod(0o755)
        self.popen: subprocess.Popen | None = None
        self._as_rabbitmq = os.geteuid() == 0
        if self._as_rabbitmq:
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")

    def url(self, vhost: str = "/") -> str:
        return with_vhost(f"amqp://guest:guest@127.0.0.1:{self.port}/", vhost)

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    def _env(self) -> dict[str, str]:
        d = self.dir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(d), "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"), "RABBITMQ_PID_FILE": str(d / "node.pid"),
        }

    def start(self) -> "RabbitMQNode":
        if not RABBITMQ_SERVER.exists():
            raise RabbitMQUnavailable(f"{RABBITMQ_SERVER} is missing (the Debian package rabbitmq-server)")
        user = {"user": "rabbitmq", "group": "rabbitmq"} if self._as_rabbitmq else {}
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen([str(RABBITMQ_SERVER)], cwd=self.dir, env=self._env(), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                          **user)
        wait_until(self.ping, NODE_READY_SECONDS, interval=0.25, what=f"RabbitMQ node {self.name} to accept clients")
        return self

    def ping(self) -> bool:
        from kombu import Connection

        if not self.alive():
            raise AssertionError(f"RabbitMQ node {self.name} exited: {self.log_tail()}")
        try:
            with Connection(self.url(), connect_timeout=0.5) as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=0.5)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        """Clean shutdown (SIGTERM)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()

    def kill(self) -> None:
        if self.popen is not None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(15)

    def _reap_group(self) -> None:
        # Erlang helpers (inet_gethost, erl_child_setup) of this node's group go with it.
        if self.popen is not None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wipe(self) -> None:
        """Forget every queue, exchange and message (only while stopped)."""
        assert not self.alive(), "wipe a stopped node"
        shutil.rmtree(self.dir / "mnesia", ignore_errors=True)

    def messages(self) -> int:
        return sum(queue_lengths(self.url(), QUEUES).values())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def destroy(self) -> None:
        self.kill()
        self._reap_group()
        shutil.rmtree(self.dir, ignore_errors=True)


class SharedVhost:
    """A virtual host of the test's own on the shared server: the broker of the scenarios that
    never stop it (the shared server is never stopped, killed or wiped)."""

    kind = "rabbitmq"

    def __init__(self, url: str):
        self._url = url

    def url(self) -> str:
        return self._url

    def messages(self) -> int:
        return sum(queue_lengths(self._url, QUEUES).values())

    def start(self):
        raise AssertionError("the shared RabbitMQ is never restarted: use stack_factory(restartable=True)")

    stop = kill = wipe = start


def server_version(url: str) -> tuple[int, ...]:
    """RabbitMQ's version as the server announces it to a client."""
    from kombu import Connection

    with Connection(url, connect_timeout=3) as conn:
        conn.connect()
        raw = conn.connection.server_properties.get("version", b"0")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# --- Apps for worker processes (``celery -A tests.rabbitmq_support:<name>``) ---------------------

RETRY_TASK = "tests.retry_three_times"


def _retrying_app(drop_headers: bool = True):
    """The project's app with one more task that retries itself three times with a countdown
    (``args: [countdown]``), logging ``tests.retry.run`` on every run. ``drop_headers=False``
    publishes the retries as Celery 5.5 does on its own (RabbitMQ's headers copied along)."""
    from celery.signals import before_task_publish

    from models.logs import log_event
    from tasks.base import project_task
    from workers.app import app
    from workers.rabbitmq import drop_broker_headers

    if not drop_headers:
        before_task_publish.disconnect(drop_broker_headers)

    @project_task(RETRY_TASK, bind=True, autoretry_for=(), max_retries=5)
    def retry_three_times(self, countdown: float) -> None:
        log_event("tests.retry.run", retries=self.request.retries)
        if self.request.retries < 3:
            raise self.retry(countdown=countdown)

    return app


def __getattr__(name: str):
    # Built only in a worker started with ``-A tests.rabbitmq_support:<name>``.
    if name == "retrying_app":
        return _retrying_app()
    if name == "retrying_app_as_celery_does":
        return _retrying_app(drop_headers=False)
    raise AttributeError(name)
