"""Canary tasks, one per queue: ``progress-reset health`` checks each is actually consumed."""

from tasks.base import project_task


def _canary(token: str) -> str:
    return token


for _queue in ("resets", "reset_batches", "notifications", "maintenance"):
    project_task(f"health.canary.{_queue}")(_canary)
