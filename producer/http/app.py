"""The FastAPI application: the routers, the middleware and the exception handlers put together.

Only assembly lives here, so that what the app is made of can be read in one
place; what each part does is in its own module. ``progress-reset serve``
runs :func:`create_app` as a uvicorn factory, one app per worker process, each
with its own metrics registry.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, disable_created_metrics
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import ProgressResetError
from models.tracing import provider, setup_tracing
from producer.http import problems
from producer.http.middleware import RequestContextMiddleware
from producer.http.openapi import custom_openapi
from producer.http.query import CheckedQuery
from producer.http.routes import audit, campaigns, ops, resets, webhooks
from producer.metrics import ResetSystemCollector

API_VERSION = "1.0.0"
API_SERVICE_NAME = "progress-reset-api"
# Probes and scrapes are not traced: they would bury the requests worth following.
UNTRACED_PATHS = "healthz,readyz,metrics"

# ``*_created`` series only double the size of every scrape; nothing here reads them.
disable_created_metrics()


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
            "problem details with a stable `code`. Query strings are checked like bodies: a parameter the "
            "operation does not take, or a single-valued one given twice, is a 422; list filters (arrays) "
            "take the parameter repeated."
        ),
    )
    app.add_middleware(RequestContextMiddleware, registry=registry)
    app.add_exception_handler(ProgressResetError, problems.on_refusal)
    app.add_exception_handler(RequestValidationError, problems.on_validation)
    app.add_exception_handler(StarletteHTTPException, problems.on_http_error)
    app.add_exception_handler(OperationalError, problems.on_database_down)
    app.add_exception_handler(SQLAlchemyError, problems.on_database_error)
    app.state.metrics_registry = registry
    if setup_tracing(API_SERVICE_NAME):  # per process: uvicorn calls this factory in each one
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # A caller's traceparent is honoured: its request's span is the parent of the one here.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider(), excluded_urls=UNTRACED_PATHS)
    app.openapi = lambda: custom_openapi(app)

    # The order of the routers is the order of the paths in the OpenAPI document. The /v1/ query
    # strings are checked like bodies; /healthz, /readyz and /metrics are left to probes and scrapers.
    for routes in (resets, campaigns, webhooks, audit):
        app.include_router(routes.router, dependencies=[CheckedQuery])
    app.include_router(ops.router)
    app.webhooks.include_router(webhooks.event_docs())
    return app


def openapi_document() -> dict:
    """The OpenAPI schema the app serves (``docs/openapi.json`` is this, committed)."""
    return create_app().openapi()
