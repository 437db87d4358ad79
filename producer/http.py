"""The HTTP producer: the reset and campaign service functions over HTTP, for other services.

``progress-reset serve`` runs :func:`create_app` on uvicorn. Every endpoint is
a thin call into :mod:`producer.resets` or :mod:`producer.campaigns` (the same
functions the CLI calls, so the rules exist once) inside one
:func:`models.db.session_scope` per request: the transaction commits when the
service function returns, and the service's tasks are published after that
commit.

Authentication: every ``/v1/`` request carries an API key
(``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, see
:mod:`producer.apikeys`), checked before the body is read. A key belongs to
one organization: the ``actor_id`` a caller names must be a user of it, and
every lookup is limited to it, so another organization's courses, jobs and
campaigns answer 404 exactly like ids that do not exist.

Errors are RFC 7807 problem details (``application/problem+json``) with a
stable ``code``; see ``docs/operations.md`` for the table.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from models.db import session_scope
from models.errors import NotFound, ProgressResetError, Unauthenticated, UnsupportedMediaType
from models.logs import log_event
from models.webhooks import EVENT_TYPES
from producer import audit, campaigns, resets, webhooks
from producer.apikeys import ApiIdentity, verify_api_key
from producer.metrics import ResetSystemCollector

API_VERSION = "1.0.0"
PROBLEM_JSON = "application/problem+json"
MAX_ID = 2**31 - 1

# ``*_created`` series only double the size of every scrape; nothing here reads them.
disable_created_metrics()

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
CampaignId = Annotated[int, Path(ge=1, le=MAX_ID)]
EndpointId = Annotated[int, Path(ge=1, le=MAX_ID)]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1)]


# --- request and response bodies ------------------------------------------------------------

class _Body(BaseModel):
    # Unknown fields are refused (a typo must not silently reset a whole course),
    # and types are not coerced ("7" is not an id).
    model_config = ConfigDict(extra="forbid", strict=True)


class ResetRequestIn(_Body):
    actor_id: Id = Field(description="The acting admin; must belong to the API key's organization.")
    course_id: Id
    learner_id: Id | None = Field(default=None, description="Reset one learner; omit to reset the whole course.")
    reason: str = Field(default="", max_length=resets.MAX_REASON)


class ConfirmIn(_Body):
    actor_id: Id = Field(description="The actor who made the request.")
    token: str = Field(min_length=1, max_length=200, description="The one-time token the request returned.")


class ActorIn(_Body):
    actor_id: Id


class CampaignRequestIn(_Body):
    actor_id: Id
    course_id: Id
    cron: str | None = Field(default=None, max_length=120,
                             description="Five-field cron expression in the campaign's time zone.")
    every_months: int | None = Field(default=None, ge=1, le=120, description="Repeat every N months from start.")
    start: str | None = Field(default=None, max_length=64,
                              description="First occurrence of a months schedule: a date, a local date-time "
                                          "or an instant with an offset.")
    time_zone: str | None = Field(default=None, max_length=64, description="IANA zone; default: the organization's.")
    completed_before_days: int | None = Field(default=None, ge=1, le=campaigns.MAX_AUDIENCE_DAYS)
    reason: str = Field(default="", max_length=campaigns.MAX_REASON)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Summary(_Out):
    learners: int = Field(description="Learners who will be reset (those with progress).")
    completions: int
    certificates: int
    learners_to_notify: int


class ResetSummary(Summary):
    course_id: int
    course_title: str = Field(description="The course's title, to recognise it before confirming.")
    learner_id: int | None = Field(description="The learner of a one-learner reset; null for a whole course.")
    learner_name: str | None = Field(description="That learner's name; null for a whole course.")
    assigned_learners: int = Field(description="Learners assigned to the course.")
    learners_keeping_state: int = Field(description="Assigned learners this reset leaves as they are.")
    irreversible: bool = Field(description="Always true: cleared progress, completions and certificates are "
                                           "deleted, not hidden.")
    description: str = Field(description="One sentence saying all of the above, for a confirmation dialog.")


class ResetRequestOut(_Out):
    request_id: str
    token: str | None = Field(description="One-time confirmation token; null when an idempotent replay finds "
                                          "the request already confirmed.")
    expires_at: datetime | None
    summary: ResetSummary
    state: str


class ConfirmOut(_Out):
    job_id: str
    state: str


class NotificationCounts(_Out):
    pending: int
    sent: int
    failed: int


class StatusOut(_Out):
    job_id: str
    state: str
    scope: str
    course_id: int
    learner_id: int | None
    learners_total: int
    learners_done: int
    batches_total: int
    batches_done: int
    batches_dead: int
    cleared: dict[str, int]
    notifications: NotificationCounts
    started_at: str | None
    finished_at: str | None
    error: str | None


class JobOut(_Out):
    job_id: str
    state: str
    scope: str
    course_id: int
    learner_id: int | None
    campaign_id: int | None
    actor_id: int
    origin: str
    reason: str
    learners_total: int
    learners_done: int
    cleared: dict[str, int]
    created_at: str | None
    confirmed_at: str | None
    finished_at: str | None
    error: str | None


class JobPage(_Out):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class AuditEventOut(_Out):
    id: int
    created_at: str
    action: str = Field(description="e.g. reset.requested, reset.confirmed, reset.succeeded, campaign.confirmed")
    organization_id: int
    actor_id: int | None
    course_id: int | None
    learner_id: int | None
    job_id: str | None
    campaign_id: int | None
    learner_count: int | None
    reason: str
    origin: str
    details: dict[str, Any]


class AuditPage(_Out):
    items: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class WebhookIn(_Body):
    url: str = Field(min_length=1, max_length=2000,
                     description="https URL of the receiver (public address). Plain http only to loopback, and only "
                                 "when WEBHOOKS_ALLOW_HTTP_LOOPBACK=true.")
    events: list[str] = Field(min_length=1, max_length=len(EVENT_TYPES),
                              description="Any of: " + ", ".join(EVENT_TYPES))


class RotateSecretIn(_Body):
    overlap_seconds: int = Field(default=webhooks.DEFAULT_OVERLAP_SECONDS, ge=0, le=webhooks.MAX_OVERLAP_SECONDS,
                                 description="How long the old secret keeps signing too (a second `v1`).")


class WebhookOut(_Out):
    id: int
    organization_id: int
    url: str
    events: list[str]
    created_at: str
    deleted_at: str | None
    previous_secret_expires_at: str | None = Field(description="While a rotation overlaps: when the old secret "
                                                               "stops signing.")


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(description="Signing secret, shown only in this response: keep it.")


class WebhookListOut(_Out):
    items: list[WebhookOut]


class DeliveryOut(_Out):
    delivery_id: int
    event_id: str
    event_type: str
    job_id: str | None
    status: str = Field(description="pending, sending, delivered, failed or cancelled")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    last_attempt_at: str | None
    delivered_at: str | None
    created_at: str


class DeliveryPage(_Out):
    items: list[DeliveryOut]
    next_cursor: str | None


class JobEventCounts(BaseModel):
    pending: int
    sent: int
    failed: int


class JobEventData(BaseModel):
    """The job at the moment of the event, in the shape of `GET /v1/resets/{job_id}`, plus who acted, why and
    from where: ids and counts only, never cleared data or personal data."""

    job_id: str
    state: str
    scope: str = Field(description="course or learner")
    course_id: int
    learner_id: int | None
    campaign_id: int | None
    actor_id: int = Field(description="Who confirmed (or cancelled) the reset.")
    reason: str
    origin: str = Field(description="cli, campaign, http:<API key name>, python")
    learners_total: int
    learners_done: int
    batches_total: int
    batches_done: int
    batches_dead: int
    learner_batches_total: int
    purge_batches_total: int
    purge_batches_done: int
    cleared: dict[str, int] = Field(description="Rows cleared per component (lesson_progress, certificates, ...).")
    notifications: JobEventCounts
    created_at: str | None
    confirmed_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None


class JobEvent(BaseModel):
    """The body of every webhook delivery. Headers: `X-Event-Id` (= `id`, for deduplication), `X-Event-Type`,
    `X-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` (one `v1` per secret in use), `X-Delivery-Attempt`."""

    id: str = Field(description="Event id: the same on every attempt and redelivery.")
    type: str = Field(description=", ".join(EVENT_TYPES))
    created_at: str
    organization_id: int
    data: JobEventData


class CampaignRequestOut(_Out):
    campaign_id: int
    token: str
    expires_at: datetime
    summary: Summary
    schedule: str
    time_zone: str
    first_occurrences: list[datetime]
    state: str


class CampaignOut(_Out):
    campaign_id: int
    course_id: int
    state: str
    schedule: str
    next_occurrence_at: str | None


class CampaignListOut(_Out):
    campaigns: list[CampaignOut]


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None


def _problem_responses(*statuses: int) -> dict:
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase,
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}


COMMON_ERRORS = (400, 401, 404, 422)
# Every body is JSON (415 otherwise); any endpoint may meet an internal error (500) or an
# unreachable database (503). Added to every operation by _openapi.
BODY_ERRORS = (415,)
SERVER_ERRORS = (500, 503)
INTEGER_NOTE = ("A JSON integer literal: a number with a fraction or an exponent (2.0, 2e0) is refused "
                "even when its value is whole; no coercion from strings either.")


# --- problem details ---------------------------------------------------------------------------

def problem(status: int, code: str, detail: str, errors: list[dict] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:progress-reset:problem:{code}", "title": HTTPStatus(status).phrase,
                            "status": status, "detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _unauthenticated(detail: str) -> JSONResponse:
    return problem(401, Unauthenticated.code, detail, headers={"WWW-Authenticate": "Bearer"})


async def _on_refusal(_request: Request, exc: ProgressResetError) -> JSONResponse:
    if isinstance(exc, Unauthenticated):
        return _unauthenticated(exc.message)
    return problem(exc.http_status, exc.code, exc.message)


async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return problem(400, "malformed_json", "the request body is not valid JSON")
    # Never echo the input back: it may hold whatever the caller sent.
    shown = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in shown)
    return problem(422, "validation_failed", f"invalid request: {fields}", errors=shown)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    response = problem(exc.status_code, code, detail)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    if exc.status_code == 405:
        # Starlette names only the first route that matched the path; a path such as
        # /v1/campaigns/{id} has one route per method.
        methods = allowed_methods(request.app, request.scope)
        if methods:
            response.headers["Allow"] = ", ".join(methods)
    return response


async def _on_database_down(_request: Request, exc: OperationalError) -> JSONResponse:
    log_event("http.database.unavailable", logging.WARNING, error=type(getattr(exc, "orig", exc)).__name__)
    return problem(503, "unavailable", "the database is unavailable; retry later", headers={"Retry-After": "5"})


async def _on_database_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
    log_event("http.database.error", logging.ERROR, error=type(exc).__name__)
    return problem(500, "internal_error", "internal error")


# --- request bodies are JSON -------------------------------------------------------------------------

def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def require_json_body(request: Request) -> None:
    """A body sent as anything but JSON (``text/plain``, a form) is refused with 415, not parsed as JSON."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        media = content_type.split(";", 1)[0].strip() or "(empty)"
        raise UnsupportedMediaType(f"the request body must be application/json, not {media}")


JsonBody = Depends(require_json_body)


def allowed_methods(app, scope) -> list[str]:
    """Every method some route of ``scope``'s path answers (a path can have one route per method)."""
    methods: set[str] = set()
    for route in getattr(app, "routes", []):
        route_methods = getattr(route, "methods", None)
        if not route_methods:
            continue
        match, _ = route.matches({**scope, "type": "http", "method": next(iter(route_methods))})
        if match is Match.FULL:
            methods |= set(route_methods)
    if methods:
        methods.add("OPTIONS")
    return sorted(methods)


# --- authentication, logs, request metrics --------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (alternative header).")


def _presented_key(headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return ""  # present but not a bearer key: refused, never ignored
        return credentials.strip()
    return headers.get("x-api-key")


def _authenticate(presented: str | None) -> ApiIdentity:
    with session_scope() as session:
        return verify_api_key(session, presented)


def current_identity(request: Request, _bearer_key=Security(_bearer), _header_key=Security(_api_key_header)
                     ) -> ApiIdentity:
    """The caller's identity, established by the middleware before the body was read."""
    identity = getattr(request.state, "identity", None)
    if identity is None:  # pragma: no cover - the middleware guards every /v1/ path
        raise Unauthenticated("an API key is required")
    return identity


Caller = Annotated[ApiIdentity, Depends(current_identity)]


class RequestContextMiddleware:
    """Authenticates ``/v1/`` requests, logs one ``http.request`` line per request and counts it.

    A pure ASGI middleware, so it sees the final status of every response,
    including the problem documents the exception handlers produce.
    """

    def __init__(self, app, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("progress_reset_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=registry)
        self.duration = Histogram("progress_reset_http_request_duration_seconds", "HTTP request duration.",
                                  ["route"], registry=registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        state = scope.setdefault("state", {})

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            if scope["method"] == "OPTIONS":
                # Which methods the path has (no key needed: the OpenAPI document says as much).
                methods = allowed_methods(scope.get("app") or self.app, scope)
                if methods:
                    response = Response(status_code=204, headers={"Allow": ", ".join(methods)})
                else:
                    response = problem(404, "not_found", "Not Found")
                await response(scope, receive, capture)
                return
            if scope["path"].startswith("/v1/"):
                response = await self._authenticate(scope, state)
                if response is not None:
                    await response(scope, receive, capture)
                    return
            await self.app(scope, receive, capture)
        except Exception as exc:
            log_event("http.unhandled", logging.ERROR, exc_info=True, error=type(exc).__name__)
            if status["sent"]:
                raise  # too late for a problem document; the server closes the connection
            status["code"] = 500
            await problem(500, "internal_error", "internal error")(scope, receive, capture)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            identity = state.get("identity")
            self.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.duration.labels(route).observe(elapsed)
            log_event("http.request", method=scope["method"], route=route, status=status["code"],
                      duration_ms=round(elapsed * 1000, 1), key=identity.prefix if identity else None)

    @staticmethod
    async def _authenticate(scope, state) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            state["identity"] = await anyio.to_thread.run_sync(_authenticate, _presented_key(headers))
        except Unauthenticated as exc:
            return _unauthenticated(exc.message)
        except OperationalError as exc:
            return await _on_database_down(None, exc)
        return None


def _route_template(scope) -> str:
    """The path template (``/v1/resets/{job_id}``), never the ids in the path."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        match, _ = candidate.matches({**scope, "type": "http"})
        if match is Match.FULL:
            return candidate.path
    return "unmatched"


# --- the app -----------------------------------------------------------------------------------

def create_app() -> FastAPI:
    """The HTTP producer. Settings come from the environment (:mod:`models.settings`)."""
    registry = CollectorRegistry()
    registry.register(ResetSystemCollector())
    app = FastAPI(
        title="progress-reset",
        version=API_VERSION,
        summary="Reset learners' course progress: validated, confirmed, audited.",
        description=(
            "Two steps, like the CLI: `POST /v1/resets` validates and returns a summary and a one-time "
            "token; `POST /v1/resets/{request_id}/confirm` with that token queues the job. Authenticate with "
            "an API key (`progress-reset api-key create`), scoped to one organization. Errors are RFC 7807 "
            "problem details with a stable `code`."
        ),
    )
    app.add_middleware(RequestContextMiddleware, registry=registry)
    app.add_exception_handler(ProgressResetError, _on_refusal)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(OperationalError, _on_database_down)
    app.add_exception_handler(SQLAlchemyError, _on_database_error)
    app.state.metrics_registry = registry
    app.openapi = lambda: _openapi(app)

    # -- resets -----------------------------------------------------------------------------

    @app.post("/v1/resets", status_code=201, response_model=ResetRequestOut, tags=["resets"],
              summary="Step 1: validate a reset and get a summary and a one-time confirmation token",
              responses=_problem_responses(*COMMON_ERRORS, 403, 409),
              dependencies=[JsonBody])
    def request_reset(
        caller: Caller,
        body: ResetRequestIn,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                      max_length=resets.MAX_IDEMPOTENCY_KEY)] = None,
    ) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            result = resets.request(session, body.actor_id, body.course_id, learner_id=body.learner_id,
                                    reason=body.reason, idempotency_key=idempotency_key, origin=caller.origin)
        return result.as_json()

    @app.post("/v1/resets/{request_id}/confirm", status_code=202, response_model=ConfirmOut, tags=["resets"],
              summary="Step 2: confirm a request with its token; the job is queued",
              responses=_problem_responses(*COMMON_ERRORS, 403, 409, 410),
              dependencies=[JsonBody])
    def confirm_reset(caller: Caller, request_id: str, body: ConfirmIn) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            result = resets.confirm(session, request_id, body.actor_id, body.token)
        return result.as_json()

    @app.get("/v1/resets", response_model=JobPage, tags=["resets"],
             summary="The key's organization's jobs, newest first, with filters and cursor pagination",
             responses=_problem_responses(*COMMON_ERRORS))
    def list_resets(
        caller: Caller,
        course_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        learner_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        state: Annotated[str | None, Query(max_length=32, description="e.g. queued, running, succeeded")] = None,
        origin: Annotated[str | None, Query(min_length=1, max_length=64,
                                            description="cli, campaign, http:<key name>, ...")] = None,
        campaign_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        created_after: Annotated[str | None, Query(max_length=64, description="ISO-8601, inclusive")] = None,
        created_before: Annotated[str | None, Query(max_length=64, description="ISO-8601, exclusive")] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=400, description="`next_cursor` of the previous page")
                          ] = None,
    ) -> dict:
        with session_scope() as session:
            return resets.list_jobs(session, caller.organization_id, course_id=course_id, learner_id=learner_id,
                                    state=state, origin=origin, campaign_id=campaign_id,
                                    created_after=created_after, created_before=created_before, limit=limit,
                                    cursor=cursor)

    @app.get("/v1/resets/{job_id}", response_model=StatusOut, tags=["resets"],
             summary="A job's state, counts, rows cleared per component and notification counts",
             responses=_problem_responses(401, 404, 422))
    def reset_status(caller: Caller, job_id: str) -> dict:
        with session_scope() as session:
            return resets.status(session, job_id, organization_id=caller.organization_id)

    @app.post("/v1/resets/{job_id}/cancel", response_model=StatusOut, tags=["resets"],
              summary="Stop a queued or running job; learners already reset stay reset",
              responses=_problem_responses(*COMMON_ERRORS, 403, 409),
              dependencies=[JsonBody])
    def cancel_reset(caller: Caller, job_id: str, body: ActorIn) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            return resets.cancel(session, job_id, body.actor_id)

    # -- campaigns --------------------------------------------------------------------------

    @app.post("/v1/campaigns", status_code=201, response_model=CampaignRequestOut, tags=["campaigns"],
              summary="Step 1: validate a retraining campaign and get a summary and a confirmation token",
              responses=_problem_responses(*COMMON_ERRORS, 403),
              dependencies=[JsonBody])
    def request_campaign(caller: Caller, body: CampaignRequestIn) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            result = campaigns.request_campaign(
                session, body.actor_id, body.course_id, cron=body.cron, every_months=body.every_months,
                start=body.start, time_zone=body.time_zone, completed_before_days=body.completed_before_days,
                reason=body.reason, origin=caller.origin)
        return result.as_json()

    @app.post("/v1/campaigns/{campaign_id}/confirm", response_model=CampaignOut, tags=["campaigns"],
              summary="Step 2: confirm a campaign with its token; it becomes active",
              responses=_problem_responses(*COMMON_ERRORS, 403, 409, 410),
              dependencies=[JsonBody])
    def confirm_campaign(caller: Caller, campaign_id: CampaignId, body: ConfirmIn) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            return campaigns.confirm_campaign(session, body.actor_id, campaign_id, body.token, origin=caller.origin)

    @app.get("/v1/campaigns", response_model=CampaignListOut, tags=["campaigns"],
             summary="The campaigns of the key's organization (optionally of one course)",
             responses=_problem_responses(*COMMON_ERRORS, 403))
    def list_campaigns(
        caller: Caller,
        actor_id: Annotated[int, Query(ge=1, le=MAX_ID)],
        course_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        include_deleted: bool = False,
    ) -> dict:
        with session_scope() as session:
            caller.require_actor(session, actor_id)
            found = campaigns.list_campaigns(session, actor_id, course_id=course_id, include_deleted=include_deleted)
        return {"campaigns": found}

    @app.get("/v1/campaigns/{campaign_id}", response_model=CampaignOut, tags=["campaigns"],
             summary="One campaign of the key's organization", responses=_problem_responses(*COMMON_ERRORS, 403))
    def get_campaign(caller: Caller, campaign_id: CampaignId,
                     actor_id: Annotated[int, Query(ge=1, le=MAX_ID)]) -> dict:
        with session_scope() as session:
            caller.require_actor(session, actor_id)
            # The listing applies the permission and organization rules; no second copy here.
            for view in campaigns.list_campaigns(session, actor_id):
                if view["campaign_id"] == campaign_id:
                    return view
        raise NotFound(f"campaign {campaign_id} not found")

    @app.post("/v1/campaigns/{campaign_id}/pause", response_model=CampaignOut, tags=["campaigns"],
              summary="Stop a campaign's occurrences until it is resumed",
              responses=_problem_responses(*COMMON_ERRORS, 403, 409),
              dependencies=[JsonBody])
    def pause_campaign(caller: Caller, campaign_id: CampaignId, body: ActorIn) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            return campaigns.pause_campaign(session, body.actor_id, campaign_id, origin=caller.origin)

    @app.post("/v1/campaigns/{campaign_id}/resume", response_model=CampaignOut, tags=["campaigns"],
              summary="Re-activate a paused campaign from its next occurrence",
              responses=_problem_responses(*COMMON_ERRORS, 403, 409),
              dependencies=[JsonBody])
    def resume_campaign(caller: Caller, campaign_id: CampaignId, body: ActorIn) -> dict:
        with session_scope() as session:
            caller.require_actor(session, body.actor_id)
            return campaigns.resume_campaign(session, body.actor_id, campaign_id, origin=caller.origin)

    @app.delete("/v1/campaigns/{campaign_id}", response_model=CampaignOut, tags=["campaigns"],
                summary="End a campaign for good (its history stays)",
                responses=_problem_responses(*COMMON_ERRORS, 403))
    def delete_campaign(caller: Caller, campaign_id: CampaignId,
                        actor_id: Annotated[int, Query(ge=1, le=MAX_ID)]) -> dict:
        with session_scope() as session:
            caller.require_actor(session, actor_id)
            return campaigns.delete_campaign(session, actor_id, campaign_id, origin=caller.origin)

    # -- webhooks ---------------------------------------------------------------------------

    @app.post("/v1/webhooks", status_code=201, response_model=WebhookCreatedOut, tags=["webhooks"],
              summary="Register a receiver for job events; the signing secret is returned once",
              responses=_problem_responses(*COMMON_ERRORS, 409))
    def create_webhook(caller: Caller, body: WebhookIn) -> dict:
        with session_scope() as session:
            return webhooks.create_endpoint(session, caller.organization_id, body.url, body.events,
                                            origin=caller.origin)

    @app.get("/v1/webhooks", response_model=WebhookListOut, tags=["webhooks"],
             summary="The key's organization's webhook endpoints (never their secrets)",
             responses=_problem_responses(401))
    def list_webhooks(caller: Caller) -> dict:
        with session_scope() as session:
            return {"items": webhooks.list_endpoints(session, caller.organization_id)}

    @app.get("/v1/webhooks/{endpoint_id}", response_model=WebhookOut, tags=["webhooks"],
             summary="One webhook endpoint", responses=_problem_responses(401, 404, 422))
    def get_webhook(caller: Caller, endpoint_id: EndpointId) -> dict:
        with session_scope() as session:
            return webhooks.get_endpoint(session, caller.organization_id, endpoint_id)

    @app.delete("/v1/webhooks/{endpoint_id}", response_model=WebhookOut, tags=["webhooks"],
                summary="Stop sending to an endpoint; its open deliveries are cancelled",
                responses=_problem_responses(401, 404, 422))
    def delete_webhook(caller: Caller, endpoint_id: EndpointId) -> dict:
        with session_scope() as session:
            return webhooks.delete_endpoint(session, caller.organization_id, endpoint_id, origin=caller.origin)

    @app.post("/v1/webhooks/{endpoint_id}/rotate-secret", response_model=WebhookCreatedOut, tags=["webhooks"],
              summary="A new signing secret; the old one also signs during the overlap",
              responses=_problem_responses(*COMMON_ERRORS))
    def rotate_webhook_secret(caller: Caller, endpoint_id: EndpointId, body: RotateSecretIn | None = None) -> dict:
        overlap = body.overlap_seconds if body is not None else webhooks.DEFAULT_OVERLAP_SECONDS
        with session_scope() as session:
            return webhooks.rotate_secret(session, caller.organization_id, endpoint_id, overlap,
                                          origin=caller.origin)

    @app.get("/v1/webhooks/{endpoint_id}/deliveries", response_model=DeliveryPage, tags=["webhooks"],
             summary="The endpoint's delivery log, newest first: event, attempts, last status, next attempt",
             responses=_problem_responses(*COMMON_ERRORS))
    def list_webhook_deliveries(
        caller: Caller, endpoint_id: EndpointId,
        status: Annotated[str | None, Query(max_length=16)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=400)] = None,
    ) -> dict:
        with session_scope() as session:
            return webhooks.list_deliveries(session, caller.organization_id, endpoint_id, status=status,
                                            limit=limit, cursor=cursor)

    @app.post("/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver", status_code=202,
              response_model=DeliveryOut, tags=["webhooks"],
              summary="Send a finished delivery again (same event id and body)",
              responses=_problem_responses(401, 404, 409, 422))
    def redeliver_webhook(caller: Caller, endpoint_id: EndpointId,
                          delivery_id: DeliveryId) -> dict:
        with session_scope() as session:
            return webhooks.redeliver(session, caller.organization_id, endpoint_id, delivery_id,
                                      origin=caller.origin)

    for event_type in EVENT_TYPES:
        def _describe(body: JobEvent) -> None:  # documentation only: what receivers get
            return None

        app.webhooks.post(event_type, summary=f"{event_type}: sent to endpoints subscribed to it",
                          status_code=200, operation_id=f"webhook_{event_type.replace('.', '_')}",
                          response_description="Any 2xx acknowledges the event. 5xx, 408, 429 and timeouts are "
                                               "retried with backoff (Retry-After honoured); other 4xx fail it.",
                          )(_describe)

    # -- audit trail ------------------------------------------------------------------------

    @app.get("/v1/audit", response_model=AuditPage, tags=["audit"],
             summary="The key's organization's audit trail, oldest first, with cursor pagination",
             responses=_problem_responses(*COMMON_ERRORS))
    def list_audit(
        caller: Caller,
        date_from: Annotated[str | None, Query(alias="from", max_length=64, description="ISO-8601, inclusive")
                             ] = None,
        date_to: Annotated[str | None, Query(alias="to", max_length=64, description="ISO-8601, exclusive")] = None,
        action: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        course_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=400, description="`next_cursor` of the previous page")
                          ] = None,
    ) -> dict:
        with session_scope() as session:
            return audit.list_events(session, caller.organization_id, date_from=date_from, date_to=date_to,
                                     action=action, course_id=course_id, limit=limit, cursor=cursor)

    # -- operations -------------------------------------------------------------------------

    @app.get("/healthz", tags=["operations"], summary="The process is up (no dependency checked)")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="The database and the broker are reachable",
             responses=_problem_responses(503))
    def readyz():
        from tasks.health import check_broker, check_database

        database, broker = check_database(timeout=2.0), check_broker(timeout=2.0)
        checks = {c.name: {"ok": c.ok, "detail": c.detail} for c in (database, broker)}
        if database.ok and broker.ok:
            return {"status": "ready", "checks": checks}
        failing = "; ".join(f"{c.name}: {c.detail}" for c in (database, broker) if not c.ok)
        response = problem(503, "unavailable", f"not ready: {failing}")
        response.headers["Retry-After"] = "5"
        return response

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with error responses documented as problem+json only."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             description=app.description, routes=app.routes, webhooks=app.webhooks.routes)
        problem_ref = {"$ref": "#/components/schemas/Problem"}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                declared = list(SERVER_ERRORS)
                if "requestBody" in operation:
                    declared += BODY_ERRORS
                for status in declared:
                    responses.setdefault(str(status), {"description": HTTPStatus(status).phrase,
                                                       "content": {PROBLEM_JSON: {"schema": problem_ref}}})
                for status, response in responses.items():
                    content = response.get("content", {})
                    if status[0] in "45" and PROBLEM_JSON in content:
                        content.pop("application/json", None)
                for parameter in operation.get("parameters", []):
                    _note_integer(parameter.get("schema", {}), parameter)
        for name, component in schema.get("components", {}).get("schemas", {}).items():
            if name.endswith("In"):  # request bodies; responses are ours and always whole numbers
                for prop in component.get("properties", {}).values():
                    _note_integer(prop, prop)
        app.openapi_schema = schema
    return app.openapi_schema


def _note_integer(schema: dict, described: dict) -> None:
    """Say in the document what strict validation does: an integer must be written as one (2, not 2.0).

    JSON Schema counts 2.0 as an integer; the API does not. ``format: int32``
    where the range fits (ids), ``int64`` for the 64-bit ones (delivery ids), and a note in
    the description.
    """
    variants = schema.get("anyOf", [schema])
    integers = [v for v in variants if v.get("type") == "integer"]
    if not integers:
        return
    for variant in integers:
        if variant.get("maximum", 2**31) <= 2**31 - 1 and variant.get("minimum", 0) >= -(2**31):
            variant.setdefault("format", "int32")
        elif variant.get("maximum", 2**63) <= 2**63 - 1 and variant.get("minimum", 0) >= -(2**63):
            variant.setdefault("format", "int64")
    if INTEGER_NOTE not in described.get("description", ""):
        described["description"] = (described.get("description", "") + " " + INTEGER_NOTE).strip()


def openapi_document() -> dict:
    """The OpenAPI schema the app serves (``docs/openapi.json`` is this, committed)."""
    return create_app().openapi()


# Problem ``code`` values the API answers with, for the docs and the tests.
PROBLEM_CODES = {
    400: ("malformed_json", "bad_request"),
    401: ("unauthenticated",),
    403: ("permission_denied",),
    404: ("not_found",),
    409: ("conflict", "token_invalid"),
    410: ("token_expired",),
    415: ("unsupported_media_type",),
    422: ("validation_failed", "nothing_to_reset"),
    500: ("internal_error",),
    503: ("unavailable",),
}

__all__ = ["create_app", "openapi_document", "PROBLEM_CODES"]
