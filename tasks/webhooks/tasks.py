"""Celery entry point of job events for subscribing services (queue ``webhooks``)."""

from __future__ import annotations

from models.job_events import DELIVER_TASK
from tasks.base import project_task
from tasks.webhooks.delivering import dispatch_endpoint


@project_task(DELIVER_TASK)
def deliver(endpoint_id: int) -> None:
    """Hand one endpoint's due job events to this process's courier (the message holds its id only)."""
    dispatch_endpoint(int(endpoint_id))
