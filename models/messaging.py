"""Publishing task messages by name, only once the transaction that wrote their rows commits.

Both sides publish through here: the workers (a task handing on work) and the producer (a
confirmed job). Neither imports the other's code: a message is a task *name* and ids, sent
through the Celery app that ``workers.app`` registers with :func:`use_app` when it is built
(the producer imports ``workers.app`` for exactly that; it never imports ``tasks``).

Savepoints follow the transaction they belong to, like Django's ``on_commit``: a publish
registered inside a savepoint that rolls back is dropped with the savepoint's writes; one
registered inside a savepoint that is released goes out when the outer transaction commits.
Nothing goes out if the outer transaction rolls back, so a worker never sees a row that
does not exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from models.logs import log_event
from models.tracing import trace_headers

_PENDING_KEY = "progress_reset.on_commit"
_LISTENING_KEY = "progress_reset.on_commit.listening"

_app = None


def use_app(app) -> None:
    """Publish through ``app`` (a Celery app) from now on; ``workers.app`` calls this when built."""
    global _app
    _app = app


def send_now(task_name: str, args: list | tuple = (), **options) -> bool:
    """Publish one task by name now; False (and a log line) when the broker refuses.

    Callers only publish for rows that are already committed, and the maintenance sweep
    re-publishes what is left unstarted, so a failed publish loses nothing.
    """
    if _app is None:
        raise RuntimeError("no Celery app to publish through: import workers.app first")
    headers = trace_headers()
    if headers:
        # The worker's run joins the publisher's trace. (In a worker the Celery instrumentation
        # also injects its publish span's context; a producer publishes by name, which that
        # instrumentation cannot follow for a task its process never imported.)
        options["headers"] = {**headers, **options.get("headers", {})}
    try:
        _app.send_task(task_name, args=list(args), **options)
        return True
    except Exception as exc:  # broker down, connection reset, ...
        log_event("publish.failed", logging.WARNING, task=task_name, args=list(args), error=type(exc).__name__,
                  detail=str(exc).splitlines()[0][:200] if str(exc) else "")
        return False


def publish_after_commit(session: Session, task_name: str, args: list | tuple = (), **options) -> None:
    """Publish ``task_name(*args)`` once ``session``'s outer transaction has committed."""
    if _app is None:  # refuse now, not after the commit when the rows are written already
        raise RuntimeError("no Celery app to publish through: import workers.app first")
    on_commit(session, _Publish(task_name, list(args), options))


@dataclass(frozen=True)
class _Publish:
    task_name: str
    args: list
    options: dict

    def __call__(self) -> None:
        send_now(self.task_name, self.args, **self.options)


def pending_publishes(session: Session) -> list[tuple[str, list, dict]]:
    """What ``session`` will publish when it commits: ``(task name, args, options)`` in order."""
    return [(c.task_name, c.args, c.options) for _owner, c in session.info.get(_PENDING_KEY, [])
            if isinstance(c, _Publish)]


def on_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run ``callback()`` after the outer transaction of ``session`` commits (see the module doc)."""
    if not session.info.get(_LISTENING_KEY):
        # Listeners stay for the session's life: removing one while SQLAlchemy dispatches the
        # same event is not allowed.
        event.listen(session, "after_commit", _run_pending)
        event.listen(session, "after_soft_rollback", _drop_rolled_back)
        session.info[_LISTENING_KEY] = True
    owner = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_PENDING_KEY, []).append((owner, callback))


def _run_pending(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint was released: its callbacks wait for the outer commit
    for _owner, callback in session.info.pop(_PENDING_KEY, []):
        callback()


def _drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    pending = session.info.get(_PENDING_KEY)
    if not pending:
        return
    if not previous_transaction.nested:
        session.info.pop(_PENDING_KEY, None)
        return
    session.info[_PENDING_KEY] = [(owner, callback) for owner, callback in pending
                                  if not _inside(owner, previous_transaction)]


def _inside(owner: SessionTransaction | None, transaction: SessionTransaction) -> bool:
    while owner is not None:
        if owner is transaction:
            return True
        owner = owner.parent
    return False
