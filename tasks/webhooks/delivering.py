"""What one ``webhooks.deliver`` message does: hand the endpoint to this process's courier.

The task only looks up the endpoint's organization and offers the endpoint to the courier
(:mod:`tasks.outbound.courier`) in that organization's lane; it ends in milliseconds, so a
receiver that answers slowly, trickles or hangs never holds a worker slot. An organization's
endpoints share ``WEBHOOKS_PER_ORGANIZATION`` of the courier's threads, so its slow receivers
never delay another organization's deliveries. An endpoint already being delivered in this
process is not offered twice.

On a courier thread, :func:`deliver_endpoint` delivers the endpoint's due rows one by one, each
claim and each outcome a short transaction of its own, never one open during the HTTP call; after
about a second (``TASK_SLICE_SECONDS``) it offers the endpoint again behind the other waiting
work, and when nothing is due it leaves one countdown task for the next retry.
"""

from __future__ import annotations

import time
from functools import partial

from sqlalchemy import select

from models.db import session_scope
from models.lag_metrics import observe_webhook_attempt
from models.schema import WebhookEndpoint
from models.settings import Settings, get_settings
from models.times import utcnow
from models.tracing import job_span
from tasks.outbound.courier import courier_for, organization_lane
from tasks.webhooks.deliveries import claim_next_delivery, record_outcome
from tasks.webhooks.sending import send_delivery
from tasks.webhooks.wakeups import schedule_wake


def dispatch_endpoint(endpoint_id: int, settings: Settings | None = None) -> bool:
    """Offer the endpoint's deliveries to the courier; False when there is nothing to offer
    (endpoint deleted) or it is already being delivered here."""
    settings = settings or get_settings()
    with session_scope() as session:
        organization_id = session.scalar(select(WebhookEndpoint.organization_id).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.deleted_at.is_(None)))
    if organization_id is None:
        return False
    return courier_for(settings).offer(("webhooks", endpoint_id), organization_lane(organization_id),
                                       partial(deliver_endpoint, endpoint_id, organization_id, settings))


def deliver_endpoint(endpoint_id: int, organization_id: int, settings: Settings,
                     slice_seconds: float | None = None) -> int:
    """Deliver the endpoint's due rows for one slice; returns how many attempts were made.

    Runs on a courier thread. Each attempt ends by ``WEBHOOKS_TIMEOUT_SECONDS``; its claim's
    lease outlives that, so two attempts of one delivery never overlap.
    """
    slice_seconds = settings.task_slice_seconds if slice_seconds is None else slice_seconds
    started = time.monotonic()
    attempts = 0
    while True:
        with session_scope() as session:
            claimed = claim_next_delivery(session, endpoint_id, settings=settings)
        if claimed is None:
            break
        # In the job's trace: the receiver gets a traceparent there (nothing when tracing is off).
        with job_span("webhooks.delivery", job_id=claimed.payload["data"]["job_id"],
                      delivery_id=claimed.delivery_id):
            outcome = send_delivery(claimed, settings)
        attempts += 1
        with session_scope() as session:
            observe_webhook_attempt(claimed.payload, record_outcome(session, claimed, outcome, settings=settings))
        if time.monotonic() - started >= slice_seconds:
            # Once this run ends, behind whatever else waits; the endpoint's lane keeps its share.
            courier_for(settings).again(("webhooks", endpoint_id), organization_lane(organization_id),
                                        partial(deliver_endpoint, endpoint_id, organization_id, settings))
            return attempts
    with session_scope() as session:
        schedule_wake(session, endpoint_id, utcnow())
    return attempts

