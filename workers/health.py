"""What ``progress-reset health``, ``/readyz`` and ``/metrics`` check: the database, the broker,
the queues' lengths, and one canary per queue proving a worker consumes it.

A queue with a long backlog (a million-learner reset fills ``reset_batches``) delays the canary
behind real work. So while waiting, health samples the queue's length; if the canary was not
consumed but the length went down, the queue is ``backlogged`` (being consumed, healthy, reported
as a warning) rather than ``not_consumed``. Queue lengths come from kombu's public
``queue_declare`` (the message count of each queue, priority lists included, on Redis and on the
embedded filesystem broker alike; passive declares on RabbitMQ). On RabbitMQ the broker check
also declares the queues as configured, so a queue left with another type fails it by name.
The canary itself is hand-made on purpose: ``celery inspect`` proves a worker answers its
control queue, not that it consumes a given task queue.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field

from kombu import Connection
from sqlalchemy import text

from models.canary import reply_store
from models.messaging import send_now
from models.queues import MALFORMED_COUNTS_KEY, QUEUES, canary_task_name, malformed_key
from models.settings import Settings, get_settings, is_redis_url
from workers import rabbitmq
from workers.app import app
from workers.config import broker_transport_options


def _first_url(url: str) -> str:
    return url.split(";")[0].strip()


def queue_lengths(settings: Settings | None = None, queues: tuple[str, ...] | list[str] = QUEUES
                  ) -> dict[str, int] | None:
    """Messages waiting in each queue (not yet delivered to a worker), or None when the broker can't say."""
    settings = settings or get_settings()
    url = _first_url(settings.broker_url)
    if settings.is_rabbitmq:
        return rabbitmq.queue_lengths(url, queues)
    if not (is_redis_url(url) or url.startswith("filesystem")):
        return None
    with Connection(url, transport_options=broker_transport_options(settings), connect_timeout=3) as conn:
        channel = conn.default_channel
        # A non-passive declare creates nothing on these transports and never fails for an empty queue.
        return {queue: int(channel.queue_declare(queue=queue).message_count) for queue in queues}


def _redis_broker_read(settings: Settings | None, read):
    """``read(client)`` on the Redis broker, or None when the broker is not Redis."""
    settings = settings or get_settings()
    url = _first_url(settings.broker_url)
    if not is_redis_url(url):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return read(client)
    finally:
        client.close()


def malformed_messages(settings: Settings | None = None, queues: tuple[str, ...] | list[str] = QUEUES
                       ) -> tuple[dict[str, int] | None, dict[str, int]] | None:
    """Messages the workers could not decode, per queue: ``(set aside so far, still kept)``.

    Redis broker: the count hash and the ``<queue>.malformed`` lists. RabbitMQ: the ``<queue>.malformed``
    queues, and the count from ``REDIS_URL`` (None without one). None on the embedded broker.
    """
    settings = settings or get_settings()
    if settings.is_rabbitmq:
        kept = rabbitmq.queue_lengths(_first_url(settings.broker_url), [malformed_key(q) for q in queues])
        counted = _malformed_counts(settings.redis_url, queues) if settings.redis_url else None
        return counted, {queue: kept[malformed_key(queue)] for queue in queues}

    def read(client) -> tuple[dict[str, int], dict[str, int]]:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(MALFORMED_COUNTS_KEY)
        for queue in queues:
            pipe.llen(malformed_key(queue))
        values = pipe.execute()
        return _per_queue(values[0], queues), {queue: int(n) for queue, n in zip(queues, values[1:])}

    return _redis_broker_read(settings, read)


def _malformed_counts(redis_url: str, queues) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return _per_queue(client.hgetall(MALFORMED_COUNTS_KEY), queues)
    finally:
        client.close()


def _per_queue(counts: dict | None, queues) -> dict[str, int]:
    named = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in (counts or {}).items()}
    return {queue: named.get(queue, 0) for queue in queues}


def redis_unacked(settings: Settings | None = None) -> int | None:
    """Messages delivered to workers and not yet acknowledged (in flight), Redis broker only."""
    return _redis_broker_read(settings, lambda client: int(client.hlen("unacked")))


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
    return Connection(_first_url(settings.broker_url)).as_uri()  # password masked


def check_broker(settings: Settings | None = None, timeout: float = 5.0) -> Check:
    """Connect to the broker once (no long retry loop)."""
    settings = settings or get_settings()
    started = time.perf_counter()
    shown = _broker_display(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=timeout)
    except Exception as exc:
        return Check("broker", False, f"{shown} unreachable: {_one_line(exc)}", time.perf_counter() - started)
    if settings.is_rabbitmq:
        try:
            problem = rabbitmq.declaration_problem(settings)
        except Exception as exc:  # noqa: BLE001 - the broker went away between the two steps
            problem = f"unreachable: {_one_line(exc)}"
        if problem is not None:
            return Check("broker", False, f"{shown}: {problem}", time.perf_counter() - started)
        shown = f"{shown} ({settings.rabbitmq_queue_type} queues)"
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


def check_queues(settings: Settings | None = None, queues: tuple[str, ...] | list[str] = QUEUES,
                 timeout: float = 10.0, poll: float = 0.1) -> list[QueueHealth]:
    """Publish one canary per queue and wait up to ``timeout`` for each to be consumed."""
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


def run_health_check(timeout: float = 10.0, queues: tuple[str, ...] | list[str] = QUEUES,
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
