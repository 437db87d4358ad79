"""The task decorator every task uses: a stable dotted name and one retry policy.

A task that cannot reach the database (PostgreSQL refused, terminated or restarting) did no
work: Celery retries it with exponential backoff and jitter (``autoretry_for``) under the same
message id, instead of failing it, since a failed task's message is acknowledged and only the
maintenance sweep, minutes later, would bring the work back. Publishing lives in
:mod:`models.messaging`, shared with the producer; the backoff of the project's own retries
(rows, units, deliveries) is :mod:`tasks.backoff`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Task, shared_task
from sqlalchemy.exc import InterfaceError, OperationalError

from models.logs import log_event

# Connection refused / terminated / lost (psycopg reports them as OperationalError, SQLAlchemy
# wraps a dead pooled connection as InterfaceError or OperationalError).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)

RETRY_BACKOFF_SECONDS = 1
RETRY_BACKOFF_MAX_SECONDS = 60


class ProjectTask(Task):
    """Logs each retry as one event with ids only (the arguments of every task are ids)."""

    def on_retry(self, exc, task_id, args, kwargs, einfo) -> None:
        log_event("task.retry", logging.WARNING, task=self.name, args=list(args), retry=self.request.retries + 1,
                  error=type(exc).__name__)


def project_task(name: str, **options) -> Callable:
    """Declare a task with an explicit, stable, dotted name; results are ignored.

    The queue comes from ``task_routes`` in the configuration, not from here, and so does the
    acknowledgement policy (``task_acks_late``, which depends on the broker). An unreachable
    database retries the task with backoff, without limit (pass ``autoretry_for=()`` to opt out).
    """
    options.setdefault("ignore_result", True)
    options.setdefault("base", ProjectTask)
    options.setdefault("autoretry_for", DATABASE_UNAVAILABLE)
    options.setdefault("retry_backoff", RETRY_BACKOFF_SECONDS)
    options.setdefault("retry_backoff_max", RETRY_BACKOFF_MAX_SECONDS)
    options.setdefault("retry_jitter", True)
    options.setdefault("max_retries", None)
    return shared_task(name=name, **options)
