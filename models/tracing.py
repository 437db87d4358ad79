"""Tracing with OpenTelemetry: one reset followed across the API, the workers and the receivers.

**Off by default, and then nothing is built**: no tracer provider, no instrumentation, no span;
every function here returns at its first line. The standard variables switch it on
(``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``; the decision is
:attr:`models.settings.Settings.tracing_exporters`), and the SDK reads the others itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_HEADERS``, ...).

Each process sets tracing up for itself, after any fork (:func:`setup_tracing`: a worker's pool
process in ``worker_process_init``, the API in its app factory): the SQLAlchemy and httpx
instrumentations here, Celery's in ``workers``, FastAPI's in ``producer.http``. Calls out to
webhook receivers and notification providers go through the project's own client
(``tasks.outbound.http``), which opens its ``CLIENT`` span with :func:`client_span`.

**The job's trace.** A confirmed job keeps the W3C ``traceparent`` of the span that confirmed
it (the caller's HTTP request, or a campaign's dispatch) in ``reset_jobs.traceparent``. Work is
not always carried by that trace: a ``resets.work`` wake-up runs whichever unit is next in turn,
a ``resets.start`` starts whichever job's turn it is, the maintenance sweep re-publishes lost
messages. So the work done for one job runs in a span that is a child of the job's trace and
links to the run that carried it (:func:`job_work`, :func:`job_span`), and a run that serves
several jobs (a notification run, a webhook delivery run) links to each of them
(:func:`link_jobs`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.db import on_new_engine, session_scope
from models.job_ids import job_uuid
from models.schema import ResetJob
from models.settings import Settings, get_settings

_provider = None  # the process's TracerProvider while tracing is on
_pid: int | None = None


def tracing_on() -> bool:
    """True once :func:`setup_tracing` switched tracing on in this process."""
    return _provider is not None and _pid == os.getpid()


def setup_tracing(service_name: str, settings: Settings | None = None) -> bool:
    """Switch tracing on in this process if the settings ask for it; True when it is on.

    Builds the tracer provider (resource from the ``OTEL_*`` variables, ``service_name`` unless
    ``OTEL_SERVICE_NAME`` says otherwise; one batch processor per exporter) and instruments
    SQLAlchemy (each engine built from now on) and httpx. Call it in the process that does the
    work, after forking; calling it again is harmless.
    """
    if tracing_on():
        return True
    exporters = (settings or get_settings()).tracing_exporters
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    install(provider)
    return True


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # The process's real standard output (a Celery worker redirects sys.stdout to its log).
        return ConsoleSpanExporter(out=sys.__stdout__ or sys.stdout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* (the SDK reads them)


def install(provider) -> None:
    """Trace through ``provider`` in this process (:func:`setup_tracing` builds it; tests pass their own)."""
    global _provider, _pid
    from opentelemetry import trace
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    trace.set_tracer_provider(provider)  # the first provider of a process stays the global one
    _provider, _pid = provider, os.getpid()
    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
    on_new_engine(_instrument_engine)


def uninstall() -> None:
    """Stop tracing in this process (tests); spans already ended are flushed."""
    global _provider
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    provider, _provider = _provider, None
    for instrumentor in (HTTPXClientInstrumentor(), SQLAlchemyInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
    if provider is not None:
        provider.force_flush()


def flush() -> None:
    """Export the spans still buffered (a worker process ending)."""
    if tracing_on():
        _provider.force_flush()


def _instrument_engine(engine) -> None:
    if not tracing_on():
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:  # an engine before this one (a fork, a new database)
        instrumentor.uninstrument()
    instrumentor.instrument(engine=engine, tracer_provider=_provider)


def provider():
    """The tracer provider in use (None while tracing is off): the Celery and FastAPI instrumentations get it."""
    return _provider if tracing_on() else None


# --- ids ---------------------------------------------------------------------------------------

def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span; None when tracing is off or no span is current."""
    if not tracing_on():
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) in a ``traceparent``; None for None."""
    return traceparent.split("-")[1] if traceparent else None


def log_fields() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, for a log line; empty when there is none."""
    if not tracing_on():
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def trace_headers() -> dict[str, str]:
    """The current trace context as message or HTTP headers (``traceparent``, ``tracestate``); empty when off."""
    if not tracing_on():
        return {}
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers


class ClientCall:
    """One call out of the system as :func:`client_span` traces it: the headers that carry its
    context to the receiver, and :meth:`answered` to record the answer's status."""

    def __init__(self, span=None):
        self._span = span
        self.headers = trace_headers() if span is not None else {}

    def answered(self, status: int) -> None:
        if self._span is not None:
            self._span.set_attribute("http.response.status_code", status)


@contextmanager
def client_span(method: str, url: str) -> Iterator[ClientCall]:
    """A ``CLIENT`` span around one call out (``method`` to ``url``), in the current trace.

    The calls out go through the project's own HTTP client (``tasks.outbound.http``), which the
    httpx instrumentation never sees. The span names the server and the path, never the query
    (it may carry a receiver's token). A failure raised inside is recorded on the span.
    """
    if not tracing_on():
        yield ClientCall()
        return
    from urllib.parse import urlsplit

    from opentelemetry import trace

    parts = urlsplit(url)
    attributes = {"http.request.method": method, "url.scheme": parts.scheme,
                  "server.address": parts.hostname or "", "url.path": parts.path or "/"}
    if parts.port:
        attributes["server.port"] = parts.port
    with _provider.get_tracer(__name__).start_as_current_span(method, kind=trace.SpanKind.CLIENT,
                                                              attributes=attributes) as span:
        yield ClientCall(span)


# --- the job's trace ---------------------------------------------------------------------------

def job_traceparents(session: Session, job_ids: Iterable) -> dict[str, str]:
    """``{job id: traceparent}`` of the jobs that have one (one query; none when tracing is off)."""
    if not tracing_on():
        return {}
    keys = {job_uuid(job_id) for job_id in job_ids if job_id is not None}
    if not keys:
        return {}
    rows = session.execute(select(ResetJob.id, ResetJob.traceparent)
                           .where(ResetJob.id.in_(keys), ResetJob.traceparent.is_not(None)))
    return {str(key): traceparent for key, traceparent in rows}


def job_traceparent(session: Session, job_id) -> str | None:
    """The job's ``traceparent`` (None when tracing is off, or the job has none)."""
    return job_traceparents(session, [job_id]).get(str(job_uuid(job_id))) if tracing_on() else None


def _span_context(traceparent: str | None):
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent:
        return trace.INVALID_SPAN_CONTEXT
    return trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))\
        .get_span_context()


def link_jobs(session: Session, job_ids: Iterable) -> None:
    """Link the current span (a run that serves several jobs) to the trace of each of ``job_ids``.

    One call after a claim, e.g. ``link_jobs(session, {row.reset_job_id for row in claimed})``;
    nothing (no query) when tracing is off.
    """
    if not tracing_on():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    for job_id, traceparent in sorted(job_traceparents(session, job_ids).items()):
        ctx = _span_context(traceparent)
        if ctx.is_valid:
            span.add_link(ctx, {"progress_reset.job_id": job_id})


class JobSpan:
    """The span of work done for one job, opened by :meth:`join` once the job is known."""

    def __init__(self, name: str):
        self.name = name
        self._span = None
        self._token = None

    def join(self, traceparent: str | None, **attributes: object) -> None:
        """Open the span: a child of the job's trace (``traceparent`` from its row; a trace of its own
        when it has none), linked to the span that carried the work (a Celery run). Once only."""
        if not tracing_on() or self._span is not None:
            return
        from opentelemetry import context, trace

        carrier = trace.get_current_span().get_span_context()
        parent = _span_context(traceparent)
        self._span = _provider.get_tracer(__name__).start_span(
            self.name, context=trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent.is_valid
            else context.Context(), links=[trace.Link(carrier)] if carrier.is_valid else None,
            attributes={f"progress_reset.{key}": value for key, value in attributes.items() if value is not None})
        self._token = context.attach(trace.set_span_in_context(self._span))

    def close(self, error: BaseException | None = None) -> None:
        if self._span is None:
            return
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        if error is not None:
            self._span.record_exception(error)
            self._span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        context.detach(self._token)
        self._span.end()
        self._span = self._token = None


@contextmanager
def job_work(name: str) -> Iterator[JobSpan]:
    """A block of work for a job not known yet: call ``.join(traceparent)`` once it is.

    The span then covers the rest of the block, including what is published after commit when
    the transaction ends inside it, and the log lines written meanwhile.
    """
    work = JobSpan(name)
    try:
        yield work
    except BaseException as exc:
        work.close(exc)
        raise
    work.close()


@contextmanager
def job_span(name: str, traceparent: str | None = None, job_id=None, **attributes: object) -> Iterator[None]:
    """A block of work for one job (see :meth:`JobSpan.join`), known by its ``traceparent`` or, when
    only ``job_id`` is given, by its id (the traceparent is then read in a short transaction of
    its own, only while tracing is on).

    E.g. around one webhook POST: ``with job_span("webhooks.delivery", traceparent, delivery_id=...):``
    then the httpx instrumentation sends the receiver a ``traceparent`` in the job's trace.
    """
    with job_work(name) as work:
        if traceparent is None and job_id is not None and tracing_on():
            with session_scope() as session:
                traceparent = job_traceparent(session, job_id)
        work.join(traceparent, job_id=None if job_id is None else str(job_id), **attributes)
        yield
