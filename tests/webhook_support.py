"""A real webhook receiver on loopback for the webhook tests.

:class:`Receiver` is a threaded HTTP server on 127.0.0.1 that records every
request (event id, type, body, both signature forms checked against the secrets it
was given, receive time), answers from a script (``script=[500, (503, {"Retry-After":
"2"})]`` then ``default``), and can hang: with ``hang`` set it holds each
request until :meth:`release` (or ``hang_seconds``) before answering.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tasks.webhooks.signing import verify_signature
from tests.loopback_support import LoopbackServer, QuietHandler


def _standard_ok(secret: str, body: bytes, headers) -> bool:
    """The Standard Webhooks signature verifies with ``secret``, and names the same event id (a
    secret made up by a test, not ``whsec_``, is the key's bytes, as the sender reads it)."""
    try:
        Webhook(secret if secret.startswith("whsec_") else secret.encode()).verify(
            body, dict(headers.items()), json_parse=False)
    except WebhookVerificationError:
        return False
    return headers.get("webhook-id") == headers.get("X-Event-Id")


@dataclass
class Received:
    event_id: str
    event_type: str
    attempt: int
    payload: dict
    signature_ok: bool
    at: float
    status: int | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class Receiver:
    default: int = 200
    script: list = field(default_factory=list)
    hang: bool = False
    hang_seconds: float = 60.0
    secrets: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.requests: list[Received] = []
        self.arrived = threading.Event()
        self._release = threading.Event()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.body()
                with receiver.lock:
                    secrets = list(receiver.secrets)
                ok = bool(secrets) and all(
                    verify_signature(s, self.headers.get("X-Signature", ""), body, time.time())
                    and _standard_ok(s, body, self.headers) for s in secrets)
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {}
                record = Received(self.headers.get("X-Event-Id", ""), self.headers.get("X-Event-Type", ""),
                                  int(self.headers.get("X-Delivery-Attempt") or 0), payload, ok, time.monotonic(),
                                  headers={k.lower(): v for k, v in self.headers.items()})
                with receiver.lock:
                    receiver.requests.append(record)
                    step = receiver.script.pop(0) if receiver.script else receiver.default
                    hang = receiver.hang
                receiver.arrived.set()
                if hang:
                    receiver._release.wait(receiver.hang_seconds)
                status, headers = step if isinstance(step, tuple) else (step, {})
                record.status = status
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender is gone (killed, or gave up after its timeout)

        self.http = LoopbackServer(Handler)

    @property
    def url(self) -> str:
        return f"{self.http.base_url}/hooks"

    def start(self) -> "Receiver":
        self.http.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.http.stop()

    def release(self) -> None:
        with self.lock:
            self.hang = False
        self._release.set()

    def got(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def events(self) -> dict[str, list[Received]]:
        """Requests grouped by event id, in arrival order."""
        out: dict[str, list[Received]] = {}
        for r in self.got():
            out.setdefault(r.event_id, []).append(r)
        return out

    def distinct(self) -> list[Received]:
        """The first request of each event id, in arrival order (what a deduplicating receiver keeps)."""
        return [attempts[0] for attempts in self.events().values()]
