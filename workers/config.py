"""Celery configuration: at-least-once delivery, queues, routing and the beat schedule.

State lives in the database (ledger tables), so results are ignored. Every task
is idempotent, which is what makes late acks safe.
"""

from __future__ import annotations

from kombu import Queue

from models import queues
from models.settings import Settings
from workers.rabbitmq import rabbitmq_config

TASK_MODULES = ("tasks.resets.tasks", "tasks.notifications.tasks", "tasks.maintenance", "tasks.campaigns",
                "tasks.health", "tasks.webhooks.tasks", "tasks.retention")

# Routing by configuration (task_routes + worker -Q), never at call sites.
TASK_ROUTES = {
    "resets.start": {"queue": queues.RESETS},
    "resets.finalize": {"queue": queues.RESETS},
    "resets.run_single": {"queue": queues.RESETS},
    "resets.work": {"queue": queues.RESET_BATCHES},
    "notifications.send": {"queue": queues.NOTIFICATIONS},
    "webhooks.deliver": {"queue": queues.WEBHOOKS},
    "maintenance.sweep": {"queue": queues.MAINTENANCE},
    "maintenance.retention": {"queue": queues.MAINTENANCE},
    "campaigns.dispatch_due": {"queue": queues.MAINTENANCE},
} | {queues.canary_task_name(queue): {"queue": queue} for queue in queues.QUEUES}


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # Each unit of work is one message hop (decision record 0005): poll the folder
            # often, not once a second (an empty poll is one directory listing).
            "polling_interval": 0.02,
        }
    if settings.broker_is_redis:
        # A message unacked this long is delivered again: longer than any task's
        # time limit and retry countdown, so only a lost worker triggers it.
        return {"visibility_timeout": settings.visibility_timeout_seconds}
    return {}


def celery_config(settings: Settings) -> dict:
    """Celery's settings for this broker (RabbitMQ's own on top: :mod:`workers.rabbitmq`)."""
    return _common_config(settings) | rabbitmq_config(settings)


def _common_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "broker_pool_limit": 4,
        "result_backend": None,
        "task_ignore_result": True,
        # At-least-once: ack after the task body, requeue if the worker process dies. The
        # filesystem broker of the embedded default hands each message out once and never
        # redelivers it, so a late ack buys nothing there (the sweep is its recovery) and only
        # stalls the worker's polling loop, which acks between polls of up to 2 s.
        "task_acks_late": not settings.broker_url.startswith("filesystem"),
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # One message per pool process in flight on Redis (a prefetched message waits behind a
        # long task); the filesystem broker's polling loop only fetches between polls, so it
        # keeps a few wake-ups at hand.
        "worker_prefetch_multiplier": 4 if settings.broker_url.startswith("filesystem") else 1,
        "task_time_limit": settings.task_time_limit_seconds,
        "task_soft_time_limit": max(1, settings.task_time_limit_seconds - 30),
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": "resets",
        "task_queues": [Queue(name, routing_key=name) for name in queues.QUEUES],
        "task_routes": TASK_ROUTES,
        "task_create_missing_queues": False,
        # Publishing when the broker is down fails fast; the sweep re-publishes.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 1.0},
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # A broker blip must not kill tasks mid-way: a running task finishes and records its
        # outcome in the database (its message may come back later; every task is idempotent).
        # Killing it would, e.g., leave notifications the provider already accepted unrecorded,
        # and so sent twice (tests/test_faults.py, Redis restarted).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "beat_schedule": {
            "maintenance-sweep": {"task": "maintenance.sweep", "schedule": settings.sweep_interval_seconds},
            "campaigns-dispatch-due": {"task": "campaigns.dispatch_due", "schedule": 60.0},
            "maintenance-retention": {"task": "maintenance.retention", "schedule": 60.0},
        },
        "timezone": "UTC",
        "enable_utc": True,
    }
