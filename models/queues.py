"""The Celery queues, named once.

Routing (``workers.config``), the canary task per queue (``tasks.health``), the health and
metrics readers (``workers.health``) and the malformed-message transport all take the names
from here, so a queue cannot be added in one place and forgotten in another.
"""

from __future__ import annotations

RESETS = "resets"
RESET_BATCHES = "reset_batches"
NOTIFICATIONS = "notifications"
MAINTENANCE = "maintenance"
WEBHOOKS = "webhooks"

QUEUES = (RESETS, RESET_BATCHES, NOTIFICATIONS, MAINTENANCE, WEBHOOKS)

# Messages a worker could not decode (workers/broker.py) are moved to ``<queue>.malformed``
# and counted per queue in this Redis hash.
MALFORMED_SUFFIX = ".malformed"
MALFORMED_COUNTS_KEY = "progress_reset.malformed_total"


def malformed_key(queue: str) -> str:
    return f"{queue}{MALFORMED_SUFFIX}"


def canary_task_name(queue: str) -> str:
    """The health canary routed to ``queue`` (one per queue)."""
    return f"health.canary.{queue}"
