"""Tracing with OpenTelemetry (models/tracing.py): one reset followed across services.

End to end: the real API (``progress-reset serve``) and real worker processes export their spans
over OTLP/HTTP to a receiver on loopback (tests/otel_support.py); a real webhook receiver records
the ``traceparent`` it is sent. A caller's trace continues through the confirm, ``resets.start``,
every unit of a two-batch reset (one of them redelivered), ``notifications.send`` and
``webhooks.deliver``. In process: the job's spans and links with the SDK's in-memory exporter.
With nothing configured, tracing is off and nothing is recorded.
"""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from models import tracing
from models.db import session_scope
from models.schema import ResetJob
from models.settings import get_settings
from models.times import utcnow
from tasks.resets.turns import claim_next_unit
from tests.notify_support import wait_until
from tests.otel_support import OtlpReceiver, traceparent
from tests.test_metrics import scrape, value
from tests.test_http_api import (  # noqa: F401 - fixtures
    api_env,
    make_tenant,
    run_cli,
    start_api,
    wait_for_state,
)
from tests.webhook_support import Receiver

CALLER_TRACE = uuid.uuid4().hex
CALLER_SPAN = uuid.uuid4().hex[:16]
CONFIRM_ROUTE = "POST /v1/resets/{request_id}/confirm"


@pytest.fixture
def otlp():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def hooks():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def traced_env(use_env, otlp: OtlpReceiver) -> dict[str, str]:
    return use_env(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp.endpoint,
                   OTEL_BSP_SCHEDULE_DELAY="100", WEBHOOKS_ALLOW_HTTP_LOOPBACK="true")


def by_id(spans) -> dict:
    return {s.span_id: s for s in spans}


@pytest.mark.e2e
def test_one_trace_from_the_callers_confirm_to_every_unit_notification_and_webhook(
        api_env, use_env, otlp, hooks, start_api, celery_worker_proc):
    env = traced_env(use_env, otlp)
    tenant = make_tenant(90, 1, "lms-traced", 21)  # batches of 50 learners (api_env): two batches
    course = tenant.course_ids[0]
    server = start_api(env)
    # Phase 1: only the resets queue is consumed, so the job starts and its units wait.
    starter = celery_worker_proc(env, queues="resets", concurrency=1, name="starter")
    with server.client(tenant.key) as api:
        endpoint = api.post("/v1/webhooks", json={"url": hooks.url, "events": ["reset.confirmed", "reset.succeeded"]})
        assert endpoint.status_code == 201, endpoint.text
        hooks.secrets = [endpoint.json()["secret"]]
        req = api.post("/v1/resets", json={"actor_id": tenant.admin_id, "course_id": course, "reason": "traced"})
        assert req.status_code == 201, req.text
        job_id = req.json()["request_id"]
        confirmed = api.post(f"/v1/resets/{job_id}/confirm", json={"actor_id": tenant.admin_id,
                                                                      "token": req.json()["token"]},
                             headers={"traceparent": traceparent(CALLER_TRACE, CALLER_SPAN)})
        assert confirmed.status_code == 202, confirmed.text
        wait_for_state(api, job_id, states=("running",))
        assert api.get(f"/v1/resets/{job_id}").json()["batches_total"] == 2

        # A worker claims the first unit and dies before running it: its message comes back.
        settings = get_settings()
        lost_message = str(uuid.uuid4())
        with session_scope() as session:
            lost = claim_next_unit(session, settings.batch_max_attempts, settings.batch_lease_seconds,
                                   owner=lost_message)
        assert lost is not None and lost.job_id == job_id

        # Phase 2: every queue is consumed; the lost unit's message is delivered again (same id,
        # and no trace context in it: the unit joins the job's trace from the job's row).
        everything = celery_worker_proc(env, concurrency=1, name="all")
        from workers.app import app

        app.send_task("resets.work", args=[], task_id=lost_message)
        status = wait_for_state(api, job_id)
        assert status["state"] == "succeeded", status
        wait_until(lambda: {r.event_type for r in hooks.got()} >= {"reset.confirmed", "reset.succeeded"}, 30,
                   what="both webhook events")
    starter.stop()

    everything.stop()  # a worker's pool process exports what it still holds as it ends
    spans = otlp.wait_for(lambda s: {"run/notifications.send", "run/webhooks.deliver", "resets.finalize",
                                     "webhooks.delivery"}
                          <= {x.name for x in s} and sum(x.name == "resets.unit" for x in s) >= 2,
                          what="the job's spans")
    ids = by_id(spans)

    # The caller's traceparent is honoured: the confirm's server span continues the caller's trace.
    confirm = [s for s in spans if s.name == CONFIRM_ROUTE and s.attributes.get("http.route")]
    assert len(confirm) == 1, [s.name for s in spans if "confirm" in s.name]
    confirm = confirm[0]
    assert (confirm.trace_id, confirm.parent_id, confirm.service) == (CALLER_TRACE, CALLER_SPAN,
                                                                     "progress-reset-api")
    with session_scope() as session:
        stored = session.scalar(select(ResetJob.traceparent).where(ResetJob.id == uuid.UUID(job_id)))
    assert stored == traceparent(CALLER_TRACE, confirm.span_id)

    # resets.start: carried by the confirm's message, run in the job's trace.
    runs = [s for s in spans if s.name == "run/resets.start"]
    assert [s.trace_id for s in runs] == [CALLER_TRACE] and runs[0].service == "progress-reset-worker"
    start = [s for s in spans if s.name == "resets.start"]
    assert len(start) == 1 and start[0].trace_id == CALLER_TRACE and start[0].parent_id == confirm.span_id
    assert [link[1] for link in start[0].links] == [runs[0].span_id]

    # Every unit is a child of the job's trace and links to the wake-up that carried it, the
    # redelivered one too, although its message carried no trace context (a trace of its own).
    units = {s.attributes["progress_reset.batch"]: s for s in spans if s.name == "resets.unit"}
    assert set(units) == {1, 2}
    for batch, unit in units.items():
        assert (unit.trace_id, unit.parent_id) == (CALLER_TRACE, confirm.span_id), batch
        assert unit.attributes["progress_reset.job_id"] == job_id
        (carrier_trace, carrier_span, _), = unit.links
        assert ids[carrier_span].name == "run/resets.work"
    redelivered = ids[units[lost.batch_no].links[0][1]]
    assert redelivered.trace_id != CALLER_TRACE and redelivered.parent_id == ""
    # The unit's own work (its SQL) is inside its span.
    assert any(s.parent_id == units[lost.batch_no].span_id and s.service == "progress-reset-worker"
               and (s.attributes.get("db.system") or s.attributes.get("db.system.name")) for s in spans)
    finalize = [s for s in spans if s.name == "resets.finalize"]
    assert finalize and all(s.trace_id == CALLER_TRACE and s.parent_id == confirm.span_id for s in finalize)

    # Notifications and webhook deliveries of the job: in its trace (published from its spans).
    for name in ("run/notifications.send", "run/webhooks.deliver"):
        runs = [s for s in spans if s.name == name]
        assert runs and all(s.trace_id == CALLER_TRACE for s in runs), name
    # A notification dispatch links to the jobs whose rows it claimed (link_jobs after the claim).
    assert any((CALLER_TRACE, confirm.span_id, job_id) == (t, sp, attrs.get("progress_reset.job_id"))
               for s in spans if s.name == "run/notifications.send" for t, sp, attrs in s.links)
    # A webhook task only hands its endpoint to the courier and ends; each POST, on a courier
    # thread, is a span of the job (a child of the confirm) linked to the task run that offered it.
    deliveries = [s for s in spans if s.name == "webhooks.delivery"]
    assert deliveries, "no webhooks.delivery span"
    for delivery in deliveries:
        assert (delivery.trace_id, delivery.parent_id) == (CALLER_TRACE, confirm.span_id), delivery
        assert delivery.attributes["progress_reset.job_id"] == job_id
        assert [ids[link[1]].name for link in delivery.links if link[1] in ids] == ["run/webhooks.deliver"]
    # The receiver continues the job's trace: every delivery carried a traceparent in it.
    for received in hooks.got():
        assert received.headers["traceparent"].split("-")[1] == CALLER_TRACE, received.headers
    assert any(s.name == "POST" and s.trace_id == CALLER_TRACE and s.service == "progress-reset-worker"
               for s in spans)

    # Trace ids where people look: the status (HTTP and CLI) and the unit's log lines.
    with server.client(tenant.key) as api:
        assert api.get(f"/v1/resets/{job_id}").json()["trace_id"] == CALLER_TRACE
    cli = run_cli(env, "status", job_id, "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["trace_id"] == CALLER_TRACE
    worker_log = starter.log_text() + everything.log_text()
    done = [line for line in json_lines(worker_log) if line.get("event") == "reset.batch.done"]
    assert {line["batch"] for line in done} == {1, 2}
    for line in done:
        assert line["trace_id"] == CALLER_TRACE and line["span_id"] in ids, line
    requests = [line for line in server.log_events("http.request") if line["route"] == "/v1/resets/{request_id}/confirm"]
    assert requests and requests[0]["trace_id"] == CALLER_TRACE

    # Both deliveries are counted, with their lag, under the organization's own label.
    with server.client(tenant.key) as api:
        samples = scrape(api)
    org = str(tenant.organization_id)
    assert value(samples, "progress_reset_webhook_delivery_attempts_total", organization=org, outcome="delivered") == 2
    assert value(samples, "progress_reset_webhook_delivery_lag_seconds_count", organization=org) == 2


def json_lines(text: str) -> list[dict]:
    lines = []
    for raw in text.splitlines():
        raw = raw.strip()
        if raw.startswith("{") and '"event"' in raw:
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
    return lines


# --- in process: the job's spans and links, with the SDK's in-memory exporter -----------------------

@pytest.fixture
def memory_spans():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield provider, exporter
    tracing.uninstall()


def make_job(session, traceparent_: str | None) -> ResetJob:
    job = ResetJob(organization_id=1, course_id=1, scope="course", actor_id=1, created_at=utcnow(),
                   traceparent=traceparent_)
    session.add(job)
    session.flush()
    return job


def test_a_run_links_to_each_job_it_serves_and_a_delivery_joins_its_jobs_trace(db_session, memory_spans, caplog):
    provider, exporter = memory_spans
    a_trace, a_span, b_trace, b_span = uuid.uuid4().hex, "a" * 16, uuid.uuid4().hex, "b" * 16
    job_a = make_job(db_session, traceparent(a_trace, a_span))
    job_b = make_job(db_session, traceparent(b_trace, b_span))
    untraced = make_job(db_session, None)

    with provider.get_tracer("test").start_as_current_span("run/webhooks.deliver") as run:
        tracing.link_jobs(db_session, [job_a.id, job_b.id, untraced.id])
        with tracing.job_span("webhooks.delivery", job_a.traceparent, delivery_id=7):
            headers = tracing.trace_headers()
            fields = tracing.log_fields()
        with tracing.job_work("resets.unit") as work:
            work.join(None)  # a job without a trace gets one of its own
        with pytest.raises(ZeroDivisionError), tracing.job_span("resets.unit", job_b.traceparent, job_id=job_b.id):
            1 / 0
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name != "resets.unit"}
    units = [s for s in exporter.get_finished_spans() if s.name == "resets.unit"]

    run_links = {(f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}",
                  link.attributes["progress_reset.job_id"]) for link in spans["run/webhooks.deliver"].links}
    assert run_links == {(a_trace, a_span, str(job_a.id)), (b_trace, b_span, str(job_b.id))}

    delivery = spans["webhooks.delivery"]
    assert (f"{delivery.context.trace_id:032x}", f"{delivery.parent.span_id:016x}") == (a_trace, a_span)
    assert [link.context.span_id for link in delivery.links] == [run.get_span_context().span_id]
    assert delivery.attributes["progress_reset.delivery_id"] == 7
    assert headers["traceparent"] == traceparent(a_trace, f"{delivery.context.span_id:016x}")
    assert fields == {"trace_id": a_trace, "span_id": f"{delivery.context.span_id:016x}"}

    own, failed = units
    assert own.parent is None and own.context.trace_id != run.get_span_context().trace_id
    assert [link.context.span_id for link in own.links] == [run.get_span_context().span_id]
    assert f"{failed.context.trace_id:032x}" == b_trace and not failed.status.is_ok
    assert failed.events[0].name == "exception"


def test_a_call_out_is_a_client_span_that_names_the_server_never_the_query(memory_spans):
    from opentelemetry.trace import SpanKind

    from tasks.outbound.deadline import Deadline
    from tasks.outbound.http import post

    _provider, exporter = memory_spans
    receiver = Receiver(default=202).start()
    try:
        with tracing.job_span("webhooks.delivery", traceparent(uuid.uuid4().hex, "c" * 16)):
            answer = post(f"{receiver.url}?token=s3cret", b"{}", {"Content-Type": "application/json"},
                          Deadline.after(5.0))
    finally:
        receiver.stop()
    assert answer.status == 202
    spans = {s.name: s for s in exporter.get_finished_spans()}
    call, delivery = spans["POST"], spans["webhooks.delivery"]
    assert call.kind == SpanKind.CLIENT and call.parent.span_id == delivery.context.span_id
    assert call.attributes["http.response.status_code"] == 202
    assert call.attributes["url.path"] == "/hooks" and "s3cret" not in repr(dict(call.attributes))
    # The receiver continues the trace from the call's own span.
    (got,) = receiver.requests
    assert got.headers["traceparent"] == traceparent(f"{call.context.trace_id:032x}", f"{call.context.span_id:016x}")


def test_tracing_is_off_by_default_and_then_records_nothing(db_session, capsys):
    assert get_settings().tracing_exporters == ()
    assert tracing.setup_tracing("progress-reset-test") is False and not tracing.tracing_on()
    job = make_job(db_session, None)
    with tracing.job_span("resets.unit", job_id=job.id), tracing.job_work("resets.start") as work:
        work.join(None)
        assert tracing.current_traceparent() is None
        assert tracing.trace_headers() == {} and tracing.log_fields() == {}
        tracing.link_jobs(db_session, [job.id])
    assert tracing.job_traceparents(db_session, [job.id]) == {}


@pytest.mark.e2e
def test_console_exporter_prints_spans_and_the_log_line_names_the_trace(api_env, use_env, start_api):
    env = use_env(OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="100")
    tenant = make_tenant(5, 1, "lms-console", 22)
    server = start_api(env)
    with server.client(tenant.key) as api:
        missing = api.get(f"/v1/resets/{uuid.uuid4()}", headers={"traceparent": traceparent(CALLER_TRACE, CALLER_SPAN)})
    assert missing.status_code == 404
    # The server span, as the SDK's console exporter prints it (JSON, ids in 0x-hex).
    wait_until(lambda: f'"trace_id": "0x{CALLER_TRACE}"' in server.log_text()
               and '"name": "GET /v1/resets/{job_id}",' in server.log_text(), 20, what="a span on standard output")
    lines = [line for line in server.log_events("http.request") if line["status"] == 404]
    assert lines and lines[0]["trace_id"] == CALLER_TRACE
