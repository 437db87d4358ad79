"""Build the Celery app from the settings in a couple of lines."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cached_property

from celery import Celery
from celery.signals import (
    after_setup_logger,
    before_task_publish,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from celery.utils.quorum_queues import detect_quorum_queues

from models.db import dispose_engine
from models.logs import configure_logging
from models.messaging import use_app
from models.settings import get_settings
from models.tracing import flush, provider, setup_tracing
from workers import broker
from workers.config import TASK_MODULES, celery_config
from workers.rabbitmq import CONFIRM_TIMEOUT_SECONDS, declare_queues, drop_broker_headers, whole_seconds

# redis:// URLs use the transport that sets undecodable messages aside (workers/broker.py).
broker.register()


class _ConfigurationOnFirstUse(Mapping):
    """Celery's configuration, built from the settings when Celery first reads it: importing the
    app (the producer does, to publish through it) never reads the environment, so a malformed
    variable is reported by the command that needs it, as one line."""

    @cached_property
    def _values(self) -> dict:
        return celery_config(get_settings())

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class ProjectCelery(Celery):
    """Celery, publishing every task (``send_now``, retries, autoretries) the way the broker can carry it."""

    def send_task(self, name, args=None, kwargs=None, countdown=None, eta=None, **options):
        driver = self.producer_pool.connections.connection.transport.driver_type
        if driver == "amqp":
            # Publisher confirms wait for RabbitMQ's answer: never for ever (workers/rabbitmq.py).
            options.setdefault("confirm_timeout", CONFIRM_TIMEOUT_SECONDS)
            if detect_quorum_queues(self, driver)[0]:
                countdown = whole_seconds(countdown)
        return super().send_task(name, args, kwargs, countdown=countdown, eta=eta, **options)


app = ProjectCelery("progress_reset", include=list(TASK_MODULES))
app.config_from_object(_ConfigurationOnFirstUse())
app.set_default()
use_app(app)  # models.messaging publishes through this app, for the workers and the producer


def reconfigure() -> None:
    """Re-read the settings in this process and rebuild what was built from them.

    For tools and tests that point one process at another database or broker:
    forgets the engine and reconfigures the Celery app, including its pooled
    broker connections and producers, which belong to the old broker URL.
    """
    from kombu import pools

    from models.settings import reset_settings_cache

    reset_settings_cache()
    dispose_engine()
    app.conf.update(celery_config(get_settings()))
    # Pools are registered globally per connection: a closed one must not be handed out again.
    pools.reset()
    app._pool = None
    # Queues, exchanges and routes were built from the old configuration too (RabbitMQ's differ).
    app.__dict__.pop("amqp", None)


# Every process that publishes (workers, beat, the producer) imports this module.
before_task_publish.connect(drop_broker_headers, weak=False)
worker_init.connect(declare_queues, weak=False)


WORKER_SERVICE_NAME = "progress-reset-worker"


@worker_process_init.connect
def _fresh_engine_in_child(**_kwargs) -> None:
    # Never share pooled connections across a fork: each pool child builds its own.
    dispose_engine()
    # Tracing too is per process, after the fork (the SDK's exporter threads and connections do
    # not survive one); off unless the OTEL_* variables ask for it (models/tracing.py).
    if setup_tracing(WORKER_SERVICE_NAME):
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider())


@worker_process_shutdown.connect
def _export_spans_left(**_kwargs) -> None:
    # A pool process ends without running atexit hooks: send what the batch processor still holds.
    flush()


@after_setup_logger.connect
def _project_logs(loglevel=None, **_kwargs) -> None:
    # Project events (reset.batch.done, ...) as one JSON object per line on stderr, ids only,
    # at the worker's own level (`-l WARNING` silences the per-run info lines).
    configure_logging(loglevel if isinstance(loglevel, int) else logging.getLevelName(loglevel or "INFO"))
