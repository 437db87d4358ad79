"""What happens to every request around the routes: the API key, one log line, the request metrics.

A pure ASGI middleware rather than a FastAPI dependency or ``BaseHTTPMiddleware``:
it checks the key before the body is read, it sees the final status of every
response (including the problem documents the exception handlers produce and
the 500 of an exception nothing handled), and it answers ``OPTIONS`` for every
path without a key, as the OpenAPI document says as much.
"""

from __future__ import annotations

import logging
import time

import anyio
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import OperationalError

from models.errors import Unauthenticated
from models.logs import log_event
from producer.http.deps import authenticate, presented_key
from producer.http.problems import on_database_down, problem, unauthenticated
from producer.http.routing import allowed_methods, route_template


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
            route = route_template(scope)
            identity = state.get("identity")
            self.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.duration.labels(route).observe(elapsed)
            log_event("http.request", method=scope["method"], route=route, status=status["code"],
                      duration_ms=round(elapsed * 1000, 1), key=identity.prefix if identity else None)

    @staticmethod
    async def _authenticate(scope, state) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            state["identity"] = await anyio.to_thread.run_sync(authenticate, presented_key(headers))
        except Unauthenticated as exc:
            return unauthenticated(exc.message)
        except OperationalError as exc:
            return await on_database_down(None, exc)
        return None
