"""Resets: request, confirm, list, status and cancel of reset jobs.

The two steps of the CLI, over HTTP: ``POST /v1/resets`` validates and returns
a summary and a one-time token, and only the confirmation with that token
queues the job, so a reset is never started by a single request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from pydantic import Field

from models.db import session_scope
from producer import resets
from models.states import JobState
from producer.http.deps import Caller, JsonBody, PageCursor, PageLimit, session_as, several
from producer.http.problems import COMMON_ERRORS, problem_responses
from producer.http.schemas import (
    ActorIn,
    ConfirmIn,
    ConfirmOut,
    Id,
    JobPage,
    ResetRequestIn,
    ResetRequestOut,
    StatusOut,
)

# The list filters of GET /v1/resets: each takes several values (any of them matches).
CourseIds = several(Id, "Jobs of this course.")
LearnerIds = several(Id, "One-learner jobs of this learner.")
States = several(Annotated[str, Field(max_length=32)], f"Jobs in this state: {', '.join(JobState)}.")
Origins = several(Annotated[str, Field(min_length=1, max_length=64)],
                  "Jobs started from here: cli, campaign, http:<key name>, ...")
CampaignIds = several(Id, "Jobs of this campaign.")

# Marks the answer to a repeated Idempotency-Key (the name Stripe and others use).
REPLAYED_HEADER = "Idempotent-Replayed"

router = APIRouter(tags=["resets"])


@router.post("/v1/resets", status_code=201, response_model=ResetRequestOut,
             summary="Step 1: validate a reset and get a summary and a one-time confirmation token",
             responses={**problem_responses(*COMMON_ERRORS, 403, 409), 201: {"headers": {REPLAYED_HEADER: {
                 "description": "`true` on the answer to a repeated Idempotency-Key (absent otherwise)",
                 "schema": {"type": "string", "enum": ["true"]}}}}},
             dependencies=[JsonBody])
def request_reset(
    caller: Caller,
    body: ResetRequestIn,
    response: Response,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=resets.MAX_IDEMPOTENCY_KEY,
        description="Repeat the request with the same key and body to get the same answer (token included), "
                    "marked `Idempotent-Replayed: true`; the same key with another body is a 422, and while "
                    "the first request is in progress a 409. Use a random key (a UUID): who holds it can "
                    "read the token.")] = None,
) -> dict:
    with session_as(caller, body.actor_id) as session:
        result = resets.request(session, body.actor_id, body.course_id, learner_id=body.learner_id,
                                reason=body.reason, idempotency_key=idempotency_key, origin=caller.origin)
    if result.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return result.as_json()


@router.post("/v1/resets/{request_id}/confirm", status_code=202, response_model=ConfirmOut,
             summary="Step 2: confirm a request with its token; the job is queued",
             responses=problem_responses(*COMMON_ERRORS, 403, 409, 410),
             dependencies=[JsonBody])
def confirm_reset(caller: Caller, request_id: str, body: ConfirmIn) -> dict:
    with session_as(caller, body.actor_id) as session:
        result = resets.confirm(session, request_id, body.actor_id, body.token)
    return result.as_json()


@router.get("/v1/resets", response_model=JobPage,
            summary="The key's organization's jobs, newest first, with filters and cursor pagination",
            responses=problem_responses(*COMMON_ERRORS))
def list_resets(
    caller: Caller,
    course_id: CourseIds = None,
    learner_id: LearnerIds = None,
    state: States = None,
    origin: Origins = None,
    campaign_id: CampaignIds = None,
    created_after: Annotated[str | None, Query(max_length=64, description="ISO-8601, inclusive")] = None,
    created_before: Annotated[str | None, Query(max_length=64, description="ISO-8601, exclusive")] = None,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
) -> dict:
    with session_scope() as session:
        return resets.list_jobs(session, caller.organization_id, course_id=course_id, learner_id=learner_id,
                                state=state, origin=origin, campaign_id=campaign_id,
                                created_after=created_after, created_before=created_before, limit=limit,
                                cursor=cursor)


@router.get("/v1/resets/{job_id}", response_model=StatusOut,
            summary="A job's state, counts, rows cleared per component and notification counts",
            responses=problem_responses(401, 404, 422))
def reset_status(caller: Caller, job_id: str) -> dict:
    with session_scope() as session:
        return resets.status(session, job_id, organization_id=caller.organization_id)


@router.post("/v1/resets/{job_id}/cancel", response_model=StatusOut,
             summary="Stop a queued or running job; learners already reset stay reset",
             responses=problem_responses(*COMMON_ERRORS, 403, 409),
             dependencies=[JsonBody])
def cancel_reset(caller: Caller, job_id: str, body: ActorIn) -> dict:
    with session_as(caller, body.actor_id) as session:
        return resets.cancel(session, job_id, body.actor_id)
