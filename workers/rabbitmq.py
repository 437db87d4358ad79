"""RabbitMQ as the broker: the project's queues as quorum queues (or classic ones), and the
Celery settings that go with them (decision record 0008).

- **Queues** are durable, declared with ``x-queue-type`` = ``RABBITMQ_QUEUE_TYPE`` (``quorum``
  by default) and bound by their own name to one topic exchange, ``progress_reset``. Topic,
  because Celery's native delayed delivery (how a countdown waits on quorum queues) hands a
  delayed message back through a ``#.<queue>`` binding, which a direct exchange cannot match.
- **Publisher confirms**: a publish returns once RabbitMQ has taken the message (on a quorum
  queue, once a majority of its replicas has it), and waits for that at most
  :data:`CONFIRM_TIMEOUT_SECONDS`; a publish that fails is the maintenance sweep's to repeat.
- **Prefetch per consumer**: quorum queues have no global QoS. Celery detects them
  (``worker_detect_quorum_queues``) and applies the prefetch count to each queue's consumer.
- **Countdowns**: with quorum queues Celery sends a countdown through its delay queues
  (``celery_delayed_0`` .. ``celery_delayed_27``, declared by every worker), which count whole
  seconds and refuse anything under one (``int(0.5)`` is 0). :func:`whole_seconds` rounds each
  countdown up to whole seconds, at least one, so the message arrives once its ETA has passed
  and never waits in a worker holding a prefetch slot.
- **Retries**: a task retried by Celery copies the headers of the message it came in, and a
  delayed message carries RabbitMQ's ``x-death`` record of the delay queues it passed through.
  RabbitMQ before 4.0.1 drops a message whose ``x-death`` says it already died in the queue it
  is dying in again (a "dead-letter cycle"): the second delayed retry of a task vanished.
  :func:`drop_broker_headers` removes those headers from every message before it is published.
- **Every worker declares every queue** (:func:`declare_queues`) before Celery binds them to
  its delay exchange, which fails for all queues when one is missing.
- **Malformed messages** (decision record 0006): :class:`Consumer` sets aside, in
  ``<queue>.malformed``, what Celery would log with its body and drop.

Nothing here applies to Redis or the embedded filesystem broker.
"""

from __future__ import annotations

import logging
import math

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection, Exchange, Queue

from models import queues
from models.logs import log_event
from models.settings import Settings, get_settings
from workers.broker import KEEP_PER_QUEUE

EXCHANGE = "progress_reset"
CONFIRM_TIMEOUT_SECONDS = 5.0
# Headers RabbitMQ writes when it dead-letters or redelivers a message: they describe the old
# message, and copied into a new one they make RabbitMQ before 4.0.1 see a dead-letter cycle.
BROKER_HEADERS = frozenset({
    "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count",
})


def task_queues(settings: Settings) -> list[Queue]:
    """The project's queues as RabbitMQ declares them."""
    exchange = Exchange(EXCHANGE, type="topic", durable=True)
    arguments = {"x-queue-type": settings.rabbitmq_queue_type}
    return [Queue(name, exchange, routing_key=name, durable=True, queue_arguments=dict(arguments))
            for name in queues.QUEUES]


def declare_queues(sender=None, **_kwargs) -> None:
    """``worker_init`` receiver: declare every queue of the project, not only those this worker consumes.

    When a worker starts, Celery's native delayed delivery binds *every* configured queue to its
    delay exchange, and at the first queue that does not exist yet it gives up on all of them
    ("Native delayed delivery will not be available"): a worker started with ``-Q notifications``
    on a fresh virtual host would leave its own countdowns with no way back from the delay
    queues. Declaring is idempotent (same name, same arguments). A broker that does not answer
    now is logged; the bindings are durable, so the next worker to start makes them.
    """
    app = getattr(sender, "app", None)
    if app is None or not get_settings().is_rabbitmq:
        return
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()
    except Exception as exc:  # noqa: BLE001 - the worker still starts; see above
        log_event("broker.queues.declare_failed", logging.WARNING, error=type(exc).__name__,
                  detail=str(exc).splitlines()[0][:200] if str(exc) else "")


def rabbitmq_config(settings: Settings) -> dict:
    """Celery settings for a RabbitMQ broker, merged over :func:`workers.config.celery_config`'s.

    For another broker the same keys get Celery's defaults, so a process that is reconfigured
    from RabbitMQ to Redis (tests, tools) keeps nothing of RabbitMQ's.
    """
    if not settings.is_rabbitmq:
        return {"task_default_exchange": None, "task_default_exchange_type": "direct",
                "worker_consumer": "celery.worker.consumer:Consumer"}
    return {
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": task_queues(settings),
        "task_default_exchange": EXCHANGE,
        "task_default_exchange_type": "topic",
        # Quorum queues have no global QoS: Celery must see them to set the prefetch per consumer
        # and to send countdowns through RabbitMQ's delay queues (its default; said here on purpose).
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
        "worker_consumer": "workers.rabbitmq:Consumer",
    }


def whole_seconds(countdown: float | None) -> float | None:
    """A countdown as native delayed delivery can carry it: whole seconds, at least one."""
    if not countdown or countdown <= 0:
        return countdown
    return float(max(1, math.ceil(countdown)))


def drop_broker_headers(headers: dict | None = None, **_kwargs) -> None:
    """``before_task_publish`` receiver: remove the headers RabbitMQ wrote on an earlier message."""
    if headers:
        for name in BROKER_HEADERS.intersection(headers):
            del headers[name]


class Consumer(CeleryConsumer):
    """Celery's consumer, setting aside what no task of this system can take (decision record 0006).

    On RabbitMQ, Celery itself receives every message (the Redis transport's check of
    ``workers/broker.py`` has no counterpart here): a body that does not decode, a message without
    a task header, a task nobody knows, a content type it refuses. Celery would log the body and
    drop the message; this consumer publishes it unchanged to ``<queue>.malformed`` (a queue of
    the configured type keeping the newest :data:`KEEP_PER_QUEUE`), counts it in Redis when
    ``REDIS_URL`` names one, logs ``broker.message.malformed`` (queue, reason, size, never the
    content) and acknowledges it. The worker goes on serving.
    """

    def on_decode_error(self, message, exc):
        self.set_aside(message, f"the message body cannot be decoded ({type(exc).__name__})")

    def on_unknown_message(self, body, message):
        self.set_aside(message, "the message has no task header")

    def on_unknown_task(self, body, message, exc):
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        self.set_aside(message, f"no task is named {str(name)[:64]!r}")

    def on_invalid_task(self, body, message, exc):
        self.set_aside(message, f"the task message is refused ({type(exc).__name__})")

    def set_aside(self, message, reason: str) -> None:
        settings = get_settings()
        key = (message.delivery_info or {}).get("routing_key") or ""
        queue = key.rsplit(".", 1)[-1] if key.rsplit(".", 1)[-1] in queues.QUEUES else "unrouted"
        kept_in = queues.malformed_key(queue)
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(message.body, exchange="", routing_key=kept_in, headers=dict(message.headers or {}),
                                 content_type=message.content_type or "application/octet-stream",
                                 content_encoding=message.content_encoding or "binary", delivery_mode=2,
                                 declare=[malformed_queue(queue, settings)], retry=True,
                                 retry_policy={"max_retries": 2, "interval_start": 0.2})
        except Exception as exc:  # noqa: BLE001 - kept or not, the message must not stop the worker
            kept_in = f"nowhere ({type(exc).__name__})"
        message.ack()
        _count(settings, queue)
        log_event("broker.message.malformed", logging.WARNING, queue=queue, reason=reason, bytes=len(message.body or b""),
                  kept_in=kept_in)


def malformed_queue(queue: str, settings: Settings) -> Queue:
    """``<queue>.malformed``: what the consumer set aside from ``queue``, the newest ones kept."""
    return Queue(queues.malformed_key(queue), Exchange(""), routing_key=queues.malformed_key(queue), durable=True,
                 queue_arguments={"x-queue-type": settings.rabbitmq_queue_type, "x-max-length": KEEP_PER_QUEUE,
                                  "x-overflow": "drop-head"})


def _count(settings: Settings, queue: str) -> None:
    if not settings.redis_url:
        return
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.hincrby(queues.MALFORMED_COUNTS_KEY, queue, 1)
    except redis.RedisError:
        pass  # the log line and the kept copy remain
    finally:
        client.close()


def queue_lengths(url: str, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Messages ready in each queue, by passive declares (nothing is created; a queue nobody has
    declared yet holds nothing and counts 0). Messages delivered and not yet acknowledged are not
    counted, as on Redis."""
    counts: dict[str, int] = {}
    with Connection(url, connect_timeout=3) as conn:
        for name in names:
            channel = conn.channel()
            try:
                counts[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                counts[name] = 0  # NOT_FOUND (it also closes the channel)
            finally:
                _close_quietly(channel)
    return counts


def declaration_problem(settings: Settings) -> str | None:
    """Why the project's queues cannot be declared as configured (a queue of the same name with other
    arguments, typically the other ``RABBITMQ_QUEUE_TYPE``), or None. Declares what is missing, as
    every publish does."""
    with Connection(settings.broker_url.split(";")[0].strip(), connect_timeout=3) as conn:
        for queue in task_queues(settings):
            channel = conn.channel()
            try:
                queue.bind(channel).declare()
            except conn.channel_errors as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return (f"queue {queue.name} cannot be declared as a {settings.rabbitmq_queue_type} queue "
                        f"({reason[:240]}); it was declared otherwise before (another RABBITMQ_QUEUE_TYPE?): "
                        "drain and delete it, or use another virtual host (docs/operations.md)")
            finally:
                _close_quietly(channel)
    return None


def _close_quietly(channel) -> None:
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - a channel the broker already closed
        pass
