"""Operations: liveness, readiness and Prometheus metrics, for the orchestrator and the monitoring.

No API key: these paths are outside ``/v1/`` so a load balancer or a scraper
can call them. Liveness checks nothing (a restart does not fix a database that
is down); readiness checks the database and the broker, so a replica that
cannot reach them is taken out of rotation.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.errors import ServiceUnavailable
from producer.http.problems import problem_responses
from workers.health import check_broker, check_database

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up (no dependency checked)")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The database and the broker are reachable",
            responses=problem_responses(503))
def readyz():
    database, broker = check_database(timeout=2.0), check_broker(timeout=2.0)
    checks = {c.name: {"ok": c.ok, "detail": c.detail} for c in (database, broker)}
    if database.ok and broker.ok:
        return {"status": "ready", "checks": checks}
    failing = "; ".join(f"{c.name}: {c.detail}" for c in (database, broker) if not c.ok)
    raise ServiceUnavailable(f"not ready: {failing}")


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
