"""Celery entry point of course-assigned notifications (queue ``notifications``)."""

from __future__ import annotations

from tasks.base import project_task
from tasks.notifications.dispatching import dispatch_notifications
from tasks.notifications.outbox import TASK_NAME


@project_task(TASK_NAME)
def send_notifications(job_id: str | None = None, reserved: int = 0) -> None:
    """``notifications.send(job_id=None, reserved=0)``: line up the job's next group of sends
    (any job's when None); ``reserved`` slots of the shared rate were reserved for now."""
    dispatch_notifications(job_id, int(reserved or 0))
