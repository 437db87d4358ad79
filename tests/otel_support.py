"""A real OTLP/HTTP trace receiver on loopback for the tracing tests.

:class:`OtlpReceiver` is a threaded HTTP server on 127.0.0.1 that accepts what the SDK's OTLP
exporter sends (``POST /v1/traces``, protobuf ``ExportTraceServiceRequest``), decodes it with
the OpenTelemetry protobuf definitions and keeps every span as a :class:`ReceivedSpan`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.loopback_support import LoopbackServer, QuietHandler


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    links: list[tuple[str, str, dict]]  # (trace id, span id, attributes)
    attributes: dict = field(default_factory=dict)


class OtlpReceiver(LoopbackServer):
    """Collects the spans exported to ``endpoint`` (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.body()
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._keep(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        super().__init__(Handler)

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        s.name, resource.get("service.name", ""), s.trace_id.hex(), s.span_id.hex(),
                        s.parent_span_id.hex(),
                        [(link.trace_id.hex(), link.span_id.hex(), {a.key: _value(a.value) for a in link.attributes})
                         for link in s.links],
                        {a.key: _value(a.value) for a in s.attributes}))
        with self.lock:
            self.spans.extend(spans)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/v1/traces"

    def got(self, name: str | None = None) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if name is None or s.name == name]

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "spans") -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` is true; returns the spans then."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.got()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise AssertionError(f"{what} not received in {timeout:.0f}s; got {len(spans)} spans: {names}")
            time.sleep(0.1)


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"
