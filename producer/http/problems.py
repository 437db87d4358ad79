"""Every error the HTTP API answers with, as an RFC 7807 problem document.

Callers branch on the status and the stable ``code``, never on the wording, so
all of them are built here, by one function, in one shape: the refusals of the
service functions (:class:`models.errors.ProgressResetError`), invalid requests,
unknown paths and methods, and a database that is down or failing. Every 503
comes from :func:`unavailable`, with the same ``Retry-After``: a route that
finds a dependency down raises :class:`models.errors.ServiceUnavailable`, and
an unreachable database (in a route, or while the middleware checks the key)
answers the same. The same module says which problems each operation
documents, so the OpenAPI document and the answers cannot drift apart.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import ProgressResetError, ServiceUnavailable, Unauthenticated
from models.logs import log_event
from producer.http.routing import allowed_methods

PROBLEM_JSON = "application/problem+json"
# How long every 503 asks the caller to wait before trying again.
RETRY_AFTER_SECONDS = "5"

# Problem ``code`` values the API answers with, for the docs and the tests.
PROBLEM_CODES = {
    400: ("malformed_json", "bad_request"),
    401: ("unauthenticated",),
    403: ("permission_denied",),
    404: ("not_found",),
    409: ("conflict", "token_invalid"),
    410: ("token_expired",),
    415: ("unsupported_media_type",),
    422: ("validation_failed", "nothing_to_reset", "idempotency_key_reused"),
    500: ("internal_error",),
    503: ("unavailable",),
}


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None


COMMON_ERRORS = (400, 401, 404, 422)


def problem_responses(*statuses: int) -> dict:
    """The ``responses`` of a route that can answer these statuses, each documented as a :class:`Problem`."""
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase,
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}


# --- building problem documents ------------------------------------------------------------------

def problem(status: int, code: str, detail: str, errors: list[dict] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:progress-reset:problem:{code}", "title": HTTPStatus(status).phrase,
                            "status": status, "detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def unauthenticated(detail: str) -> JSONResponse:
    return problem(401, Unauthenticated.code, detail, headers={"WWW-Authenticate": "Bearer"})


def unavailable(detail: str) -> JSONResponse:
    """Every 503: a dependency is down (:class:`~models.errors.ServiceUnavailable`, or the database failing)."""
    return problem(ServiceUnavailable.http_status, ServiceUnavailable.code, detail,
                   headers={"Retry-After": RETRY_AFTER_SECONDS})


# --- exception handlers ------------------------------------------------------------------------------

async def on_refusal(_request: Request, exc: ProgressResetError) -> JSONResponse:
    if isinstance(exc, Unauthenticated):
        return unauthenticated(exc.message)
    if isinstance(exc, ServiceUnavailable):
        return unavailable(exc.message)
    return problem(exc.http_status, exc.code, exc.message)


async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return problem(400, "malformed_json", "the request body is not valid JSON")
    # Never echo the input back: it may hold whatever the caller sent.
    shown = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in shown)
    return problem(422, "validation_failed", f"invalid request: {fields}", errors=shown)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
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


async def on_database_down(_request: Request | None, exc: OperationalError) -> JSONResponse:
    log_event("http.database.unavailable", logging.WARNING, error=type(getattr(exc, "orig", exc)).__name__)
    return unavailable("the database is unavailable; retry later")


async def on_database_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
    log_event("http.database.error", logging.ERROR, error=type(exc).__name__)
    return problem(500, "internal_error", "internal error")
