"""The one publish-after-commit helper and the task decorator every task uses."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import current_app, shared_task
from sqlalchemy import event
from sqlalchemy.orm import Session

from models.logs import log_event

_PENDING_KEY = "progress_reset.publish_after_commit"
_LISTENING_KEY = "progress_reset.publish_after_commit.listening"


def send_now(task_name: str, args: list | tuple = (), **options) -> bool:
    """Publish one task by name; False (and a log line) when the broker refuses.

    Callers only publish rows that are already committed, and the maintenance
    sweep re-publishes what is left unstarted, so a failed publish loses nothing.
    """
    try:
        current_app.send_task(task_name, args=list(args), **options)
        return True
    except Exception as exc:  # broker down, connection reset, ...
        log_event("publish.failed", logging.WARNING, task=task_name, args=list(args), error=type(exc).__name__,
                  detail=str(exc).splitlines()[0][:200] if str(exc) else "")
        return False


def publish_after_commit(session: Session, task_name: str, args: list | tuple = (), **options) -> None:
    """Publish ``task_name(*args)`` once ``session``'s transaction has committed.

    Nothing is sent if the transaction rolls back, so a worker never sees a row
    that does not exist yet. Savepoints (``begin_nested``) ending in between
    neither publish nor drop anything: only the outer transaction decides.
    """
    if not session.info.get(_LISTENING_KEY):
        # Listeners stay for the session's life: removing one while SQLAlchemy
        # dispatches the same event is not allowed.
        event.listen(session, "after_commit", _flush_pending)
        event.listen(session, "after_soft_rollback", _drop_pending)
        session.info[_LISTENING_KEY] = True
    session.info.setdefault(_PENDING_KEY, []).append((task_name, list(args), options))


def _flush_pending(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a SAVEPOINT was released; the outer transaction has not committed yet
    for task_name, args, options in session.info.pop(_PENDING_KEY, []):
        send_now(task_name, args, **options)


def _drop_pending(session: Session, previous_transaction) -> None:
    if previous_transaction.nested:
        return  # only a SAVEPOINT rolled back; the outer transaction may still commit
    session.info.pop(_PENDING_KEY, None)


def project_task(name: str, **options) -> Callable:
    """Declare a task with an explicit, stable, dotted name; results are ignored.

    The queue comes from ``task_routes`` in the configuration, not from here, and so does the
    acknowledgement policy (``task_acks_late``, which depends on the broker).
    """
    options.setdefault("ignore_result", True)
    return shared_task(name=name, **options)
