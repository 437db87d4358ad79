"""Celery entry point of course-assigned notifications (queue ``notifications``)."""

from __future__ import annotations

from tasks.base import project_task
from tasks.notifications.dispatching import dispatch_notifications
from tasks.notifications.outbox import TASK_NAME


@project_task(TASK_NAME)
def send_notifications(job_id: str | None = None, reserved: int = 0, slot_at: float | None = None) -> None:
    """``notifications.send(job_id=None, reserved=0, slot_at=None)``: line up the job's next group of
    sends (any job's when None); ``reserved`` slots of the shared rate were reserved for ``slot_at``."""
    dispatch_notifications(job_id, int(reserved or 0), float(slot_at) if slot_at is not None else None)
