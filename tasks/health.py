"""Health: canary tasks, one per queue, and the checks ``progress-reset health`` runs.

A worker can be alive, answer pings and still consume nothing (after a broker
reconnect, with its consumer cancelled, or listening to the wrong queues), so
health proves consumption end to end: it publishes ``health.canary.<queue>``
with a fresh random nonce (the only argument: an id, like every task's), routed
to ``<queue>`` by the ordinary ``task_routes``, and waits for the worker that
runs it to leave a *reply*:

- with Redis (``settings.redis_url``, which defaults to the Redis broker) the
  reply is a key ``progress_reset:health:<nonce>:<queue>`` that expires after
  five minutes;
- on the embedded filesystem broker (no Redis) it is a small file
  ``<data_dir>/health/<nonce>.<queue>.json``: the embedded workers share the
  machine and the data directory with the command, so the same proof works.

The reply names the worker and whether that worker reached the database. A
canary carries ``expires``: one that nobody consumed in time is discarded by
the worker that eventually receives it, never run late.

A queue with a long backlog (a million-learner reset fills ``reset_batches``)
delays the canary behind real work. So while waiting, health samples the
queue's length; if the canary was not consumed but the length went down, the
queue is ``backlogged`` (being consumed, healthy, reported as a warning)
rather than ``not_consumed``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import text

from models.logs import log_event
from models.settings import Settings, get_settings
from tasks.base import project_task

# One canary task per queue. Kept equal to ``workers.config.QUEUES`` (a test
# checks it): ``tasks`` does not import ``workers``.
CANARY_QUEUES = ("resets", "reset_batches", "notifications", "maintenance", "webhooks")
REPLY_KEY_PREFIX = "progress_reset:health"
REPLY_TTL_SECONDS = 300
_NONCE = re.compile(r"^[0-9a-f]{8,64}$")
# kombu's Redis transport keeps priorities above 0 in sibling lists ``<queue>\x06\x16<n>``.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (3, 6, 9)


def canary_task_name(queue: str) -> str:
    return f"health.canary.{queue}"


# --- where canaries reply ---------------------------------------------------------------

class _RedisReplies:
    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)

    @staticmethod
    def _key(nonce: str, queue: str) -> str:
        return f"{REPLY_KEY_PREFIX}:{nonce}:{queue}"

    def put(self, nonce: str, queue: str, reply: dict) -> None:
        self.client.set(self._key(nonce, queue), json.dumps(reply), ex=REPLY_TTL_SECONDS)

    def get_many(self, nonce: str, queues: list[str]) -> dict[str, dict]:
        values = self.client.mget([self._key(nonce, q) for q in queues]) if queues else []
        return {q: json.loads(v) for q, v in zip(queues, values) if v is not None}

    def discard(self, nonce: str, queues: list[str]) -> None:
        if queues:
            self.client.delete(*[self._key(nonce, q) for q in queues])

    def close(self) -> None:
        self.client.close()

    describe = "redis"


class _FileReplies:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, nonce: str, queue: str) -> Path:
        return self.folder / f"{nonce}.{queue}.json"

    def put(self, nonce: str, queue: str, reply: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self._path(nonce, queue)
        partial = final.with_suffix(".tmp")
        partial.write_text(json.dumps(reply))
        os.replace(partial, final)  # readers never see half a reply

    def get_many(self, nonce: str, queues: list[str]) -> dict[str, dict]:
        found = {}
        for queue in queues:
            try:
                found[queue] = json.loads(self._path(nonce, queue).read_text())
            except (FileNotFoundError, ValueError):
                continue
        return found

    def discard(self, nonce: str, queues: list[str]) -> None:
        for queue in queues:
            self._path(nonce, queue).unlink(missing_ok=True)
        # Replies that arrived after their check gave up: keep the folder small.
        cutoff = time.time() - REPLY_TTL_SECONDS
        for stale in self.folder.glob("*.json"):
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()
            except FileNotFoundError:
                continue

    def close(self) -> None:
        pass

    describe = "file"


def reply_store(settings: Settings):
    """Redis when one is configured (production), else files under the data directory (embedded)."""
    if settings.redis_url:
        return _RedisReplies(settings.redis_url)
    return _FileReplies(settings.data_dir / "health")


# --- the canary (worker side) ---------------------------------------------------------------

def record_canary(queue: str, nonce: str, worker: str, settings: Settings | None = None) -> dict:
    """Leave the reply for canary ``nonce`` on ``queue``: who consumed it and whether it reached the database."""
    settings = settings or get_settings()
    if not _NONCE.match(nonce or ""):
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


CANARIES = {queue: _make_canary(queue) for queue in CANARY_QUEUES}


# --- broker inspection (queue lengths) ---------------------------------------------------------

def _first_url(url: str) -> str:
    return url.split(";")[0].strip()


def queue_lengths(settings: Settings | None = None, queues: tuple[str, ...] | list[str] = CANARY_QUEUES
                  ) -> dict[str, int] | None:
    """Messages waiting in each queue (not yet delivered to a worker), or None when the broker can't say.

    Redis: ``LLEN`` of the queue's list (and its priority siblings). Embedded
    filesystem broker: the message files waiting for that queue.
    """
    settings = settings or get_settings()
    url = _first_url(settings.broker_url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            pipe = client.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
                for step in _REDIS_PRIORITY_STEPS:
                    pipe.llen(f"{queue}{_REDIS_PRIORITY_SEP}{step}")
            values = pipe.execute()
        finally:
            client.close()
        per = 1 + len(_REDIS_PRIORITY_STEPS)
        return {queue: int(sum(values[i * per:(i + 1) * per])) for i, queue in enumerate(queues)}
    if url.startswith("filesystem"):
        folder = settings.broker_folder / "out"
        counts = dict.fromkeys(queues, 0)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return counts
        for name in names:
            for queue in queues:
                if name.endswith(f".{queue}.msg"):
                    counts[queue] += 1
        return counts
    return None


# Messages a worker could not decode (workers/broker.py) are moved to ``<queue>.malformed``
# and counted per queue in this hash.
MALFORMED_SUFFIX = ".malformed"
MALFORMED_COUNTS_KEY = "progress_reset.malformed_total"


def malformed_key(queue: str) -> str:
    return f"{queue}{MALFORMED_SUFFIX}"


def _redis_broker_read(settings: Settings | None, read):
    """``read(client)`` on the Redis broker, or None when the broker is not Redis."""
    settings = settings or get_settings()
    url = _first_url(settings.broker_url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return read(client)
    finally:
        client.close()


def redis_malformed(settings: Settings | None = None, queues: tuple[str, ...] | list[str] = CANARY_QUEUES
                    ) -> tuple[dict[str, int], dict[str, int]] | None:
    """Messages the workers could not decode, per queue: ``(set aside so far, still kept)``; Redis only."""
    def read(client) -> tuple[dict[str, int], dict[str, int]]:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(MALFORMED_COUNTS_KEY)
        for queue in queues:
            pipe.llen(malformed_key(queue))
        values = pipe.execute()
        counts = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in (values[0] or {}).items()}
        total = {queue: counts.get(queue, 0) for queue in queues}
        kept = {queue: int(n) for queue, n in zip(queues, values[1:])}
        return total, kept

    return _redis_broker_read(settings, read)


def redis_unacked(settings: Settings | None = None) -> int | None:
    """Messages delivered to workers and not yet acknowledged (in flight), Redis broker only."""
    return _redis_broker_read(settings, lambda client: int(client.hlen("unacked")))


# --- the checks (command side) --------------------------------------------------------------------

@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass
class QueueHealth:
    queue: str
    ok: bool
    # ok | backlogged | not_consumed | not_published | database_unreachable
    state: str
    detail: str
    worker: str | None = None
    seconds: float | None = None
    waiting: int | None = None


@dataclass
class HealthReport:
    database: Check
    broker: Check
    queues: list[QueueHealth] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.database.ok and self.broker.ok and all(q.ok for q in self.queues)

    def problems(self) -> list[str]:
        found = [f"{c.name}: {c.detail}" for c in (self.database, self.broker) if not c.ok]
        found += [f"queue {q.queue}: {q.detail}" for q in self.queues if not q.ok]
        return found

    def as_json(self) -> dict:
        return {"ok": self.ok, "database": asdict(self.database), "broker": asdict(self.broker),
                "queues": {q.queue: asdict(q) for q in self.queues}, "problems": self.problems()}


def check_database(settings: Settings | None = None, timeout: float = 5.0) -> Check:
    """``SELECT 1`` and the schema revision against the migrations' head."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.pool import NullPool

    from models.db import make_engine
    from models.migrate import alembic_config

    settings = settings or get_settings()
    started = time.perf_counter()
    kind = "PostgreSQL" if settings.is_postgres else "SQLite"
    if settings.is_postgres:
        engine = make_engine(settings.database_url, poolclass=NullPool,
                             connect_args={"connect_timeout": max(1, int(timeout))})
    else:
        engine = make_engine(settings.database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            revision = MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:
        return Check("database", False, f"{kind} unreachable: {_one_line(exc)}", time.perf_counter() - started)
    finally:
        engine.dispose()
    heads = set(ScriptDirectory.from_config(alembic_config(settings.database_url)).get_heads())
    elapsed = time.perf_counter() - started
    if revision not in heads:
        return Check("database", False, f"{kind} schema is at {revision or 'nothing'}, the code expects "
                     f"{', '.join(sorted(heads))}; run 'progress-reset db upgrade'", elapsed)
    return Check("database", True, f"{kind}, schema at {revision} (head)", elapsed)


def _broker_display(settings: Settings) -> str:
    from kombu import Connection

    return Connection(_first_url(settings.broker_url)).as_uri()  # password masked


def check_broker(settings: Settings | None = None, timeout: float = 5.0) -> Check:
    """Connect to the broker once (no long retry loop)."""
    from celery import current_app

    settings = settings or get_settings()
    started = time.perf_counter()
    shown = _broker_display(settings)
    try:
        with current_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=timeout)
    except Exception as exc:
        return Check("broker", False, f"{shown} unreachable: {_one_line(exc)}", time.perf_counter() - started)
    return Check("broker", True, shown, time.perf_counter() - started)


def judge_queue(queue: str, reply: dict | None, waited: float, lengths: list[int | None],
                timeout: float) -> QueueHealth:
    """Decide a queue's health from its canary reply and the queue lengths seen while waiting."""
    known = [n for n in lengths if n is not None]
    waiting = known[-1] if known else None
    if reply is not None:
        if reply.get("database") != "ok":
            return QueueHealth(queue, False, "database_unreachable",
                               f"worker {reply.get('worker')} consumed the canary but its database is "
                               f"{reply.get('database')}", reply.get("worker"), round(waited, 3), waiting)
        return QueueHealth(queue, True, "ok", f"consumed by {reply.get('worker')} in {waited:.2f}s",
                           reply.get("worker"), round(waited, 3), waiting)
    consumed = any(b < a for a, b in zip(known, known[1:]))
    if consumed:
        return QueueHealth(queue, True, "backlogged",
                           f"canary still queued behind {_messages(waiting)} after {timeout:g}s, but the queue "
                           "is being consumed", None, None, waiting)
    backlog = f" ({_messages(waiting)} waiting)" if waiting is not None else ""
    return QueueHealth(queue, False, "not_consumed",
                       f"no worker consumed the canary within {timeout:g}s{backlog}; is a worker running with "
                       f"-Q {queue}?", None, None, waiting)


def check_queues(settings: Settings | None = None, queues: tuple[str, ...] | list[str] = CANARY_QUEUES,
                 timeout: float = 10.0, poll: float = 0.1) -> list[QueueHealth]:
    """Publish one canary per queue and wait up to ``timeout`` for each to be consumed."""
    from models.messaging import send_now

    settings = settings or get_settings()
    nonce = secrets.token_hex(8)
    store = reply_store(settings)
    started = time.monotonic()
    results: dict[str, QueueHealth] = {}
    lengths: dict[str, list[int | None]] = {q: [] for q in queues}
    waited: dict[str, float] = {}
    replies: dict[str, dict] = {}

    def sample() -> None:
        try:
            current = queue_lengths(settings, list(queues)) or {}
        except Exception:
            current = {}
        for q in queues:
            lengths[q].append(current.get(q))

    sample()
    last_sample = time.monotonic()
    pending = []
    for queue in queues:
        if send_now(canary_task_name(queue), [nonce], expires=timeout):
            pending.append(queue)
        else:
            results[queue] = QueueHealth(queue, False, "not_published", "could not publish the canary (broker?)")
    try:
        while pending:
            elapsed = time.monotonic() - started
            for queue, reply in store.get_many(nonce, pending).items():
                replies[queue] = reply
                waited[queue] = elapsed
            pending = [q for q in pending if q not in replies]
            if not pending or elapsed >= timeout:
                break
            time.sleep(poll)
            if time.monotonic() - last_sample >= 0.5:
                sample()
                last_sample = time.monotonic()
        sample()
    finally:
        try:
            store.discard(nonce, list(queues))
        finally:
            store.close()
    for queue in queues:
        if queue not in results:
            results[queue] = judge_queue(queue, replies.get(queue), waited.get(queue, timeout), lengths[queue],
                                         timeout)
    return [results[q] for q in queues]


def run_health_check(timeout: float = 10.0, queues: tuple[str, ...] | list[str] = CANARY_QUEUES,
                     settings: Settings | None = None) -> HealthReport:
    """Database, broker and one canary per queue; the canaries are skipped when the broker is down."""
    settings = settings or get_settings()
    database = check_database(settings, timeout=min(timeout, 5.0))
    broker = check_broker(settings, timeout=min(timeout, 5.0))
    if broker.ok:
        queue_results = check_queues(settings, queues, timeout=timeout)
    else:
        queue_results = [QueueHealth(q, False, "not_published", "broker unreachable") for q in queues]
    return HealthReport(database, broker, queue_results)


def _messages(n: int | None) -> str:
    return f"{n} message" if n == 1 else f"{n} messages"


def _one_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(inner).__name__
