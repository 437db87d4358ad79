"""Health canaries, one task per queue: the worker side of ``progress-reset health``.

A worker can be alive, answer pings and still consume nothing (after a broker reconnect, with
its consumer cancelled, or listening to the wrong queues), so health proves consumption end to
end: the command (:mod:`workers.health`) publishes ``health.canary.<queue>`` with a fresh random
nonce, routed to ``<queue>`` by the ordinary ``task_routes``, and waits for the worker that runs
it to leave a reply (:mod:`models.canary`) naming the worker and whether it reached the database.
A canary carries ``expires``: one nobody consumed in time is discarded, never run late.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from sqlalchemy import text

from models.canary import NONCE, reply_store
from models.logs import log_event
from models.queues import QUEUES, canary_task_name
from models.settings import Settings, get_settings
from tasks.base import project_task


def record_canary(queue: str, nonce: str, worker: str, settings: Settings | None = None) -> dict:
    """Leave the reply for canary ``nonce`` on ``queue``: who consumed it and whether it reached the database."""
    settings = settings or get_settings()
    if not NONCE.match(nonce or ""):
        raise ValueError("a canary nonce is 8 to 64 lowercase hex digits")
    database = "ok"
    try:
        from models.db import get_engine

        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # the reply says so; health reports it
        database = f"unreachable: {type(exc).__name__}"
    reply = {"worker": worker, "database": database, "pid": os.getpid(),
             "at": datetime.now(timezone.utc).isoformat()}
    store = reply_store(settings)
    try:
        store.put(nonce, queue, reply)
    finally:
        store.close()
    log_event("health.canary.consumed", queue=queue, nonce=nonce, worker=worker, database=database)
    return reply


def _make_canary(queue: str):
    def canary(self, nonce: str) -> None:
        record_canary(queue, nonce, self.request.hostname or "unknown")

    canary.__name__ = f"canary_{queue}"
    canary.__qualname__ = canary.__name__
    canary.__doc__ = f"Prove that a worker consumes the {queue!r} queue (``progress-reset health``)."
    return project_task(canary_task_name(queue), bind=True, autoretry_for=(), max_retries=0)(canary)


CANARIES = {queue: _make_canary(queue) for queue in QUEUES}
