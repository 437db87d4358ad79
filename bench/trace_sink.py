"""A loopback OTLP/HTTP endpoint that accepts spans and throws them away, for ``--tracing on``.

The workers export to it exactly as to a collector (protobuf over HTTP, batched), so a run with
tracing on pays for recording, batching, encoding and sending every span; the sink only counts
the requests and bytes it was sent.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TraceSink:
    def __init__(self):
        self.requests = 0
        self.bytes = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                size = len(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with lock:
                    sink.requests += 1
                    sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def stop(self) -> dict:
        self.server.shutdown()
        self.server.server_close()
        return {"export_requests": self.requests, "export_bytes": self.bytes}
