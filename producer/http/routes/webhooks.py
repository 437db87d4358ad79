"""Webhooks: the organization's receivers of job events, their secrets and delivery logs.

Besides the endpoints, this module documents what receivers get: one
``webhooks`` entry of the OpenAPI document per event type, all with the body
:class:`~producer.http.schemas.JobEvent`, so a receiver can be generated from
the same document as a client.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import Field

from models.db import session_scope
from models.job_events import EVENT_TYPES
from producer import webhooks
from producer.http.deps import Caller, PageCursor, PageLimit, several
from producer.http.problems import COMMON_ERRORS, problem_responses
from producer.http.schemas import (
    MAX_ID,
    DeliveryOut,
    DeliveryPage,
    JobEvent,
    RotateSecretIn,
    WebhookCreatedOut,
    WebhookIn,
    WebhookListOut,
    WebhookOut,
)

EndpointId = Annotated[int, Path(ge=1, le=MAX_ID)]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1)]
Statuses = several(Annotated[str, Field(max_length=16)],
                   "Deliveries in this status: pending, sending, delivered, failed, cancelled.")

router = APIRouter(tags=["webhooks"])


@router.post("/v1/webhooks", status_code=201, response_model=WebhookCreatedOut,
             summary="Register a receiver for job events; the signing secret is returned once",
             responses=problem_responses(*COMMON_ERRORS, 409))
def create_webhook(caller: Caller, body: WebhookIn) -> dict:
    with session_scope() as session:
        return webhooks.create_endpoint(session, caller.organization_id, body.url, body.events,
                                        origin=caller.origin)


@router.get("/v1/webhooks", response_model=WebhookListOut,
            summary="The key's organization's webhook endpoints (never their secrets)",
            responses=problem_responses(401))
def list_webhooks(caller: Caller) -> dict:
    with session_scope() as session:
        return {"items": webhooks.list_endpoints(session, caller.organization_id)}


@router.get("/v1/webhooks/{endpoint_id}", response_model=WebhookOut,
            summary="One webhook endpoint", responses=problem_responses(401, 404, 422))
def get_webhook(caller: Caller, endpoint_id: EndpointId) -> dict:
    with session_scope() as session:
        return webhooks.get_endpoint(session, caller.organization_id, endpoint_id)


@router.delete("/v1/webhooks/{endpoint_id}", response_model=WebhookOut,
               summary="Stop sending to an endpoint; its open deliveries are cancelled",
               responses=problem_responses(401, 404, 422))
def delete_webhook(caller: Caller, endpoint_id: EndpointId) -> dict:
    with session_scope() as session:
        return webhooks.delete_endpoint(session, caller.organization_id, endpoint_id, origin=caller.origin)


@router.post("/v1/webhooks/{endpoint_id}/rotate-secret", response_model=WebhookCreatedOut,
             summary="A new signing secret; the old one also signs during the overlap",
             responses=problem_responses(*COMMON_ERRORS))
def rotate_webhook_secret(caller: Caller, endpoint_id: EndpointId, body: RotateSecretIn | None = None) -> dict:
    overlap = body.overlap_seconds if body is not None else webhooks.DEFAULT_OVERLAP_SECONDS
    with session_scope() as session:
        return webhooks.rotate_secret(session, caller.organization_id, endpoint_id, overlap,
                                      origin=caller.origin)


@router.get("/v1/webhooks/{endpoint_id}/deliveries", response_model=DeliveryPage,
            summary="The endpoint's delivery log, newest first: event, attempts, last status, next attempt",
            responses=problem_responses(*COMMON_ERRORS))
def list_webhook_deliveries(
    caller: Caller, endpoint_id: EndpointId,
    status: Statuses = None,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
) -> dict:
    with session_scope() as session:
        return webhooks.list_deliveries(session, caller.organization_id, endpoint_id, status=status,
                                        limit=limit, cursor=cursor)


@router.post("/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=DeliveryOut,
             summary="Send a finished delivery again (same event id and body)",
             responses=problem_responses(401, 404, 409, 422))
def redeliver_webhook(caller: Caller, endpoint_id: EndpointId,
                      delivery_id: DeliveryId) -> dict:
    with session_scope() as session:
        return webhooks.redeliver(session, caller.organization_id, endpoint_id, delivery_id,
                                  origin=caller.origin)


def event_docs() -> APIRouter:
    """One entry per event type for the app's ``webhooks`` (documentation only): what receivers get."""
    docs = APIRouter()
    for event_type in EVENT_TYPES:
        def _describe(body: JobEvent) -> None:
            return None

        docs.post(event_type, summary=f"{event_type}: sent to endpoints subscribed to it",
                  status_code=200, operation_id=f"webhook_{event_type.replace('.', '_')}",
                  response_description="Any 2xx acknowledges the event. 5xx, 408, 429 and timeouts are "
                                       "retried with backoff (Retry-After honoured); other 4xx fail it.",
                  )(_describe)
    return docs
