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

Nothing here applies to Redis or the embedded filesystem broker.
"""

from __future__ import annotations

import math

from kombu import Exchange, Queue

from models import queues
from models.settings import Settings

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


def rabbitmq_config(settings: Settings) -> dict:
    """Celery settings for a RabbitMQ broker, merged over :func:`workers.config.celery_config`'s.

    For another broker the same keys get Celery's defaults, so a process that is reconfigured
    from RabbitMQ to Redis (tests, tools) keeps nothing of RabbitMQ's.
    """
    if not settings.is_rabbitmq:
        return {"task_default_exchange": None, "task_default_exchange_type": "direct"}
    return {
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": task_queues(settings),
        "task_default_exchange": EXCHANGE,
        "task_default_exchange_type": "topic",
        # Quorum queues have no global QoS: Celery must see them to set the prefetch per consumer
        # and to send countdowns through RabbitMQ's delay queues (its default; said here on purpose).
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
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
