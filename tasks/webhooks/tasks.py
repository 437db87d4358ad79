"""Celery entry point of job events for subscribing services (queue ``webhooks``)."""

from __future__ import annotations

from models.job_events import DELIVER_TASK
from tasks.base import project_task
from tasks.webhooks.delivering import deliver_endpoint


@project_task(DELIVER_TASK)
def deliver(endpoint_id: int) -> None:
    """Deliver one endpoint's due job events (ids only in the message: the endpoint's id)."""
    deliver_endpoint(int(endpoint_id))
