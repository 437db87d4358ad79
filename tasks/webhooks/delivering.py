"""One ``webhooks.deliver`` run: deliver an endpoint's due rows, one by one, for about a second.

Each claim and each outcome is its own short transaction, never held open during the HTTP
call. When the run's budget is spent the task is published again; when the next delivery is
only a short wait away (a retry, a lease ending), one countdown task wakes for it.
"""

from __future__ import annotations

import time

import httpx

from models.db import session_scope
from models.job_events import DELIVER_TASK
from models.lag_metrics import observe_webhook_attempt
from models.messaging import send_now
from models.settings import Settings, get_settings
from models.times import utcnow
from models.tracing import link_jobs
from tasks.webhooks.deliveries import claim_next_delivery, record_outcome
from tasks.webhooks.sending import send_delivery
from tasks.webhooks.wakeups import schedule_wake

# A run stops claiming after this long and re-publishes itself.
RUN_BUDGET_SECONDS = 1.0


def deliver_endpoint(endpoint_id: int, settings: Settings | None = None,
                     budget_seconds: float = RUN_BUDGET_SECONDS) -> int:
    """Deliver the endpoint's due rows until none is left or the budget is spent; returns how many were sent.

    Each claim and each outcome is its own short transaction. When the budget
    runs out the task is re-published; when the next delivery is only a short
    wait away (a retry, a lease ending), one countdown task wakes for it.
    """
    settings = settings or get_settings()
    started = time.monotonic()
    sent = 0
    with httpx.Client(timeout=httpx.Timeout(settings.webhooks_timeout_seconds,
                                            connect=min(settings.webhooks_timeout_seconds, 3.0)),
                      follow_redirects=False, trust_env=False) as client:
        while True:
            with session_scope() as session:
                claimed = claim_next_delivery(session, endpoint_id, settings=settings)
                link_jobs(session, [claimed.payload["data"]["job_id"]] if claimed else [])  # the event's job
            if claimed is None:
                break
            outcome = send_delivery(claimed, settings, client)
            sent += 1
            with session_scope() as session:
                observe_webhook_attempt(claimed.payload, record_outcome(session, claimed, outcome, settings=settings))
            if time.monotonic() - started >= budget_seconds:
                send_now(DELIVER_TASK, [endpoint_id])
                return sent
    with session_scope() as session:
        schedule_wake(session, endpoint_id, utcnow())
    return sent
