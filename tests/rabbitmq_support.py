"""RabbitMQ for the tests: virtual hosts of this test process on the shared server, what the
broker says about its queues, and worker apps with a task that retries itself.

- Virtual hosts ``pr_t<pid>_v<n>`` are created with ``rabbitmqctl`` (root, the
  local node) and deleted at the end; those of test processes that died are deleted at the
  start, like their databases.
- :func:`queue_types` asks the broker itself (``rabbitmqctl list_queues name type``).
- ``-A tests.rabbitmq_support:retrying_app``: the project's app with one more task that retries
  itself with a countdown (and ``retrying_app_as_celery_does``, without the project's publish hook).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from urllib.parse import quote, urlsplit, urlunsplit

VHOST_PREFIX = f"pr_t{os.getpid()}"


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
