"""Which routes answer a request's path, for the answers that name them.

A 405 and an ``OPTIONS`` answer list every method of the path in ``Allow``,
and the request log and metrics name the path template (``/v1/resets/{job_id}``)
rather than the path, so that no id reaches a label. Both need the app's routes
matched against the request outside FastAPI's own routing: the middleware runs
before it, and Starlette names only the first route that matched.
"""

from __future__ import annotations

from starlette.routing import Match


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


def route_template(scope) -> str:
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
