"""Real providers on loopback for the notification tests, and small helpers.

- :class:`SmtpSink`: an aiosmtpd server on 127.0.0.1 that keeps every message it
  accepts, refuses chosen addresses with 550, can answer 451 to everyone, can be
  stopped (connections refused) and started again on the same port, and can hold
  one delivery after accepting it (to kill the sender before it learns the outcome).
- :class:`WebhookSink`: an HTTP server on 127.0.0.1 that verifies the signature,
  dedupes by ``Idempotency-Key`` (a duplicate is answered 200 with the first
  delivery's id, as real providers do) and counts both raw deliveries and
  distinct keys; it can answer 503 with Retry-After, stall, refuse connections,
  reject chosen addresses with 422 and hold one delivery.

Both record the receive time of each delivery, which is what the rate-limit
test measures.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import insert, select
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from models.jobs import target_filter
from models.schema import Course, CourseAssignment, Notification, ResetJob, User
from models.states import JobScope, JobState, NotificationStatus
from models.times import utcnow

HOLD_SECONDS = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)


def measured_rate(times: list[float]) -> float:
    """Sends per second between the first and the last of ``times`` (n sends, n-1 intervals)."""
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0])


def insert_outbox(session: Session, course_id: int, job_id: uuid.UUID | None = None) -> tuple[uuid.UUID, set[int]]:
    """Write the outbox rows a course-wide reset would (one per learner with progress whose
    setting allows it), and its (finished) job if there is none, for tests of the sender alone.
    Returns (job id, notified user ids)."""
    job_id = job_id or uuid.uuid4()
    if session.get(ResetJob, job_id) is None:
        course = session.get(Course, course_id)
        session.add(ResetJob(id=job_id, organization_id=course.organization_id, course_id=course_id,
                             scope=JobScope.COURSE, state=JobState.SUCCEEDED, actor_id=0, created_at=utcnow(),
                             summary={}, cleared={}))
        session.flush()
    a, u = CourseAssignment.__table__.c, User.__table__.c
    users = session.scalars(
        select(a.user_id).join(User.__table__, u.id == a.user_id)
        .where(target_filter(course_id), u.notify_course_assigned).order_by(a.user_id)
    ).all()
    if users:
        session.execute(insert(Notification.__table__), [
            {"user_id": uid, "course_id": course_id, "reset_job_id": job_id, "kind": "course_assigned",
             "status": NotificationStatus.PENDING, "attempts": 0} for uid in users])
    return job_id, set(users)


# --- SMTP -------------------------------------------------------------------------------------

@dataclass
class SmtpDelivery:
    message_id: str
    rcpt: list[str]
    subject: str
    text: str
    headers: dict[str, str]
    at: float


class _SmtpHandler:
    def __init__(self, sink: "SmtpSink"):
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        sink = self.sink
        if address.lower() in sink.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if sink.tempfail:
            return "451 4.3.0 Temporary failure, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        sink = self.sink
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        body = message.get_body(("plain",))
        delivery = SmtpDelivery(
            message_id=str(message["Message-ID"]), rcpt=list(envelope.rcpt_tos), subject=str(message["Subject"]),
            text=body.get_content() if body is not None else "", headers={k: str(v) for k, v in message.items()},
            at=time.monotonic(),
        )
        with sink.lock:
            sink.deliveries.append(delivery)
            number = len(sink.deliveries)
        if sink.hold_at is not None and number == sink.hold_at:
            # Accepted: the message is ours. The sender does not hear so until released.
            sink.held_delivery = delivery
            sink.held.set()
            deadline = time.monotonic() + HOLD_SECONDS
            while not sink.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return f"250 2.0.0 Ok: queued as Q{number}"


class SmtpSink:
    """A real SMTP server on loopback (aiosmtpd), recording what it accepts."""

    def __init__(self, port: int | None = None, **smtp_kwargs):
        self.port = port or free_port()
        self.smtp_kwargs = smtp_kwargs
        self.lock = threading.Lock()
        self.deliveries: list[SmtpDelivery] = []
        self.refuse: set[str] = set()
        self.tempfail = False
        self.hold_at: int | None = None
        self.held_delivery: SmtpDelivery | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self._controller = None

    def start(self) -> "SmtpSink":
        from aiosmtpd.controller import Controller

        self._controller = Controller(_SmtpHandler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10,
                                      **self.smtp_kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.stop()

    def env(self) -> dict[str, str]:
        return {"NOTIFY_BACKEND": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port)}

    def by_recipient(self) -> dict[str, list[SmtpDelivery]]:
        with self.lock:
            out: dict[str, list[SmtpDelivery]] = {}
            for d in self.deliveries:
                for r in d.rcpt:
                    out.setdefault(r, []).append(d)
            return out

    def count(self) -> int:
        with self.lock:
            return len(self.deliveries)


# --- webhook ----------------------------------------------------------------------------------

@dataclass
class WebhookDelivery:
    key: str
    status: int
    signature_ok: bool
    payload: dict | None
    at: float
    duplicate: bool = False


@dataclass
class _WebhookState:
    secret: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    deliveries: list[WebhookDelivery] = field(default_factory=list)
    accepted: dict[str, WebhookDelivery] = field(default_factory=dict)
    fail_status: int | None = None
    retry_after: str | None = None
    stall_seconds: float = 0.0
    reject_emails: set[str] = field(default_factory=set)
    hold_at: int | None = None
    held_key: str | None = None
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    connections: set = field(default_factory=set)


class _WebhookHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real provider's endpoint
    disable_nagle_algorithm = True  # headers and body go out as two writes
    state: _WebhookState

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.state.connections.add(self.connection)

    def finish(self) -> None:
        with self.state.lock:
            self.state.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, document: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(document).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the sender went away (killed, timed out)
            self.close_connection = True

    def do_POST(self) -> None:
        state = self.state
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        now = time.monotonic()
        key = self.headers.get("Idempotency-Key") or ""
        expected = "sha256=" + hmac.new(state.secret.encode(), body, hashlib.sha256).hexdigest()
        signature_ok = hmac.compare_digest(expected, self.headers.get("X-Signature") or "")
        try:  # and the Standard Webhooks form, keyed with the secret's bytes, naming the same key
            Webhook(state.secret.encode()).verify(body, dict(self.headers.items()), json_parse=False)
            signature_ok = signature_ok and self.headers.get("webhook-id") == key
        except WebhookVerificationError:
            signature_ok = False
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if state.stall_seconds:
            time.sleep(state.stall_seconds)
        if state.fail_status is not None:
            with state.lock:
                state.deliveries.append(WebhookDelivery(key, state.fail_status, signature_ok, payload, now))
            self._answer(state.fail_status, {"error": "unavailable"},
                         {"Retry-After": state.retry_after} if state.retry_after else None)
            return
        if not signature_ok or not key or payload is None:
            with state.lock:
                state.deliveries.append(WebhookDelivery(key, 401, signature_ok, payload, now))
            self._answer(401, {"error": "bad signature or missing key"})
            return
        if payload["learner"]["email"] in state.reject_emails:
            with state.lock:
                state.deliveries.append(WebhookDelivery(key, 422, signature_ok, payload, now))
            self._answer(422, {"error": "recipient address is invalid"})
            return
        with state.lock:
            first = state.accepted.get(key)
            delivery = WebhookDelivery(key, 200, signature_ok, payload, now, duplicate=first is not None)
            state.deliveries.append(delivery)
            if first is None:
                state.accepted[key] = delivery
            hold = first is None and state.hold_at is not None and len(state.accepted) == state.hold_at
        if hold:
            # Accepted and stored; the sender does not hear so until released.
            state.held_key = key
            state.held.set()
            state.release.wait(HOLD_SECONDS)
        self._answer(200, {"id": f"wh-{key}", "duplicate": first is not None})


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        pass  # a sender killed or timed out mid-request is part of the tests


class WebhookSink:
    """A real HTTP server on loopback that receives, verifies and dedupes webhook deliveries."""

    def __init__(self, secret: str = "test-secret", port: int | None = None):
        self.port = port or free_port()
        self.state = _WebhookState(secret=secret)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/course-assigned"

    def env(self) -> dict[str, str]:
        return {"NOTIFY_BACKEND": "webhook", "NOTIFY_WEBHOOK_URL": self.url, "NOTIFY_WEBHOOK_SECRET": self.state.secret}

    def start(self) -> "WebhookSink":
        handler = type("Handler", (_WebhookHandler,), {"state": self.state})
        self._server = _QuietServer(("127.0.0.1", self.port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections: new sends are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.state.lock:
            connections = list(self.state.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "WebhookSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.state.release.set()
        self.stop()

    # what it saw
    def accepted(self) -> dict[str, WebhookDelivery]:
        with self.state.lock:
            return dict(self.state.accepted)

    def deliveries(self) -> list[WebhookDelivery]:
        with self.state.lock:
            return list(self.state.deliveries)

    def keys_per_learner(self) -> Counter:
        """Distinct idempotency keys accepted per learner id: exactly one each means one message each."""
        return Counter(d.payload["learner"]["id"] for d in self.accepted().values())
