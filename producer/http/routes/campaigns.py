"""Campaigns: recurring resets of a course (retraining), requested and confirmed in two steps.

A campaign resets learners again and again on its schedule, so it is confirmed
with a token like a reset, and pausing, resuming and ending it are actions of
an admin of the key's organization, audited like the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query

from models.errors import NotFound
from producer import campaigns
from producer.http.deps import Caller, JsonBody, session_as
from producer.http.problems import COMMON_ERRORS, problem_responses
from producer.http.schemas import (
    MAX_ID,
    ActorIn,
    CampaignListOut,
    CampaignOut,
    CampaignRequestIn,
    CampaignRequestOut,
    ConfirmIn,
)

CampaignId = Annotated[int, Path(ge=1, le=MAX_ID)]

router = APIRouter(tags=["campaigns"])


@router.post("/v1/campaigns", status_code=201, response_model=CampaignRequestOut,
             summary="Step 1: validate a retraining campaign and get a summary and a confirmation token",
             responses=problem_responses(*COMMON_ERRORS, 403),
             dependencies=[JsonBody])
def request_campaign(caller: Caller, body: CampaignRequestIn) -> dict:
    with session_as(caller, body.actor_id) as session:
        result = campaigns.request_campaign(
            session, body.actor_id, body.course_id, cron=body.cron, every_months=body.every_months,
            start=body.start, time_zone=body.time_zone, completed_before_days=body.completed_before_days,
            reason=body.reason, origin=caller.origin)
    return result.as_json()


@router.post("/v1/campaigns/{campaign_id}/confirm", response_model=CampaignOut,
             summary="Step 2: confirm a campaign with its token; it becomes active",
             responses=problem_responses(*COMMON_ERRORS, 403, 409, 410),
             dependencies=[JsonBody])
def confirm_campaign(caller: Caller, campaign_id: CampaignId, body: ConfirmIn) -> dict:
    with session_as(caller, body.actor_id) as session:
        return campaigns.confirm_campaign(session, body.actor_id, campaign_id, body.token, origin=caller.origin)


@router.get("/v1/campaigns", response_model=CampaignListOut,
            summary="The campaigns of the key's organization (optionally of one course)",
            responses=problem_responses(*COMMON_ERRORS, 403))
def list_campaigns(
    caller: Caller,
    actor_id: Annotated[int, Query(ge=1, le=MAX_ID)],
    course_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    include_deleted: bool = False,
) -> dict:
    with session_as(caller, actor_id) as session:
        found = campaigns.list_campaigns(session, actor_id, course_id=course_id, include_deleted=include_deleted)
    return {"campaigns": found}


@router.get("/v1/campaigns/{campaign_id}", response_model=CampaignOut,
            summary="One campaign of the key's organization", responses=problem_responses(*COMMON_ERRORS, 403))
def get_campaign(caller: Caller, campaign_id: CampaignId,
                 actor_id: Annotated[int, Query(ge=1, le=MAX_ID)]) -> dict:
    with session_as(caller, actor_id) as session:
        # The listing applies the permission and organization rules; no second copy here.
        for view in campaigns.list_campaigns(session, actor_id):
            if view["campaign_id"] == campaign_id:
                return view
    raise NotFound(f"campaign {campaign_id} not found")


def _state_change(action: str, change: Callable[..., dict], summary: str) -> None:
    """``POST /v1/campaigns/{campaign_id}/<action>``: pausing and resuming are one request in two directions."""

    def endpoint(caller: Caller, campaign_id: CampaignId, body: ActorIn) -> dict:
        with session_as(caller, body.actor_id) as session:
            return change(session, body.actor_id, campaign_id, origin=caller.origin)

    router.post(f"/v1/campaigns/{{campaign_id}}/{action}", name=f"{action}_campaign", response_model=CampaignOut,
                summary=summary, responses=problem_responses(*COMMON_ERRORS, 403, 409),
                dependencies=[JsonBody])(endpoint)


_state_change("pause", campaigns.pause_campaign, "Stop a campaign's occurrences until it is resumed")
_state_change("resume", campaigns.resume_campaign, "Re-activate a paused campaign from its next occurrence")


@router.delete("/v1/campaigns/{campaign_id}", response_model=CampaignOut,
               summary="End a campaign for good (its history stays)",
               responses=problem_responses(*COMMON_ERRORS, 403))
def delete_campaign(caller: Caller, campaign_id: CampaignId,
                    actor_id: Annotated[int, Query(ge=1, le=MAX_ID)]) -> dict:
    with session_as(caller, actor_id) as session:
        return campaigns.delete_campaign(session, actor_id, campaign_id, origin=caller.origin)
