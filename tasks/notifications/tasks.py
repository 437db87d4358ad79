"""Celery entry point of course-assigned notifications (queue ``notifications``)."""

from __future__ import annotations

from tasks.base import project_task
from tasks.notifications.outbox import TASK_NAME
from tasks.notifications.sending import send_due_notifications


@project_task(TASK_NAME, bind=True)
def send_notifications(self, job_id: str | None = None) -> None:
    """``notifications.send(job_id=None)``: send the job's due notifications (any job's when None)."""
    send_due_notifications(job_id, owner=self.request.id)
