"""Where a rendered notification goes: console, SMTP or webhook (``NOTIFY_BACKEND``).

Every backend has one method, ``send(message) -> provider_id``, and reports a
failure by raising :class:`TransientSendError` (try again later) or
:class:`PermanentSendError` (this message can never succeed), so the sender
decides retries the same way whatever the transport. A backend may keep a
connection open across messages; ``close()`` ends it. One instance is used by one thread.

Every send ends by a total deadline (:func:`send_deadline_seconds`: connect, send and the whole
answer), so a slow or trickling provider fails the attempt instead of holding it, and at most
64 KiB of an HTTP answer is read.

The message itself, with the identifiers a provider recognises a resend by, is
made in :mod:`tasks.notifications.message`; a backend only moves it.

Failure reasons are stored on the outbox row and may be logged, so e-mail
addresses are removed from them (:func:`tasks.outbound.answers.redact`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import socket
import ssl
import time
from pathlib import Path

from models.settings import Settings
from tasks.notifications.message import OutgoingMessage, build_email
from tasks.outbound.answers import parse_retry_after, redact
from tasks.outbound.deadline import Deadline, cut_off_at
from tasks.outbound.http import Answer, CallFailed, post
from tasks.outbound.signatures import standard_webhook_headers

USER_AGENT = "progress-reset-notifications/1"
# SMTP connections idle longer than this are checked with NOOP before reuse.
SMTP_IDLE_CHECK_SECONDS = 5.0
# A local file write has no outside party; this only bounds its claim's lease.
CONSOLE_DEADLINE_SECONDS = 1.0


def send_deadline_seconds(settings: Settings) -> float:
    """The total deadline of one send with the configured backend (a claim's lease outlives it)."""
    if settings.notify_backend == "smtp":
        return settings.smtp_timeout_seconds
    if settings.notify_backend == "webhook":
        return settings.notify_webhook_timeout_seconds
    return CONSOLE_DEADLINE_SECONDS

class SendError(Exception):
    """A send failed. ``code`` is a short machine token for logs (``smtp_550``, ``http_503``, ``timeout``)."""

    transient = False

    def __init__(self, reason: str, code: str, *, retry_after: float | None = None, affects_all: bool = False):
        super().__init__(reason)
        self.reason = redact(reason)
        self.code = code
        self.retry_after = retry_after
        # True when the provider itself is unwell (down, overloaded, timing out), so the
        # other messages of the chunk would fail the same way and are not tried now.
        self.affects_all = affects_all


class TransientSendError(SendError):
    """Try again later: connection refused or reset, timeout, SMTP 4xx, HTTP 408/425/429/5xx."""

    transient = True


class PermanentSendError(SendError):
    """This message will never be accepted: SMTP 5xx for the recipient or content, HTTP 4xx."""


class BackendConfigError(RuntimeError):
    """The backend's settings are incomplete; nothing can be sent until they are fixed."""


class NotificationBackend:
    name = "base"

    def send(self, message: OutgoingMessage) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- console --------------------------------------------------------------------------------

class ConsoleBackend(NotificationBackend):
    """One JSON line per notification, appended to a file or written to stdout.

    Each line is written with a single ``write(2)`` on a descriptor opened with
    ``O_APPEND``, so lines from several worker processes never interleave, and it
    is on its way to the file the moment ``send`` returns. stdout is file
    descriptor 1 itself, bypassing Celery's redirection of ``sys.stdout`` to the log.
    """

    name = "console"

    def __init__(self, path: str = ""):
        self.path = path
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if not self.path:
            return 1
        if self._fd is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def send(self, message: OutgoingMessage) -> str:
        line = json.dumps(message.payload(), ensure_ascii=False, sort_keys=True) + "\n"
        data = line.encode("utf-8")
        try:
            fd = self._descriptor()
            written = os.write(fd, data)
        except OSError as exc:
            raise TransientSendError(f"console output {self.path or 'stdout'}: {exc.strerror}", "console_io",
                                     affects_all=True) from exc
        if written != len(data):  # a full disk; the partial line is followed by a complete one on retry
            raise TransientSendError("console output: short write", "console_io", affects_all=True)
        return f"console:{message.idempotency_key}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- SMTP -----------------------------------------------------------------------------------

def _smtp_text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


class SmtpBackend(NotificationBackend):
    """Real e-mail through an SMTP relay, one connection reused for a task run.

    Classification: a 5xx answer to RCPT TO (unknown or refused recipient) or to
    the message content is permanent; 4xx answers, 5xx to MAIL FROM (our
    configuration), refused connections, timeouts and disconnects are transient.
    """

    name = "smtp"

    def __init__(self, settings: Settings):
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.starttls = settings.smtp_starttls
        self.username = settings.smtp_username
        self.password = settings.smtp_password
        self.sender = settings.smtp_from
        self.timeout = settings.smtp_timeout_seconds
        self._conn: smtplib.SMTP | None = None
        self._last_used = 0.0

    def _connect(self, deadline: Deadline) -> smtplib.SMTP:
        conn = smtplib.SMTP(self.host, self.port, timeout=deadline.clamp(self.timeout))
        try:
            with cut_off_at(conn.sock, deadline):
                conn.ehlo()
                if self.starttls:
                    conn.starttls(context=ssl.create_default_context())
                    conn.ehlo()
                if self.username:
                    conn.login(self.username, self.password)
        except BaseException:
            self._quietly_close(conn)
            raise
        return conn

    def _connection(self, deadline: Deadline) -> smtplib.SMTP:
        if self._conn is not None and time.monotonic() - self._last_used > SMTP_IDLE_CHECK_SECONDS:
            try:
                with cut_off_at(self._conn.sock, deadline):
                    code, _ = self._conn.noop()
                if code != 250:
                    raise smtplib.SMTPServerDisconnected("NOOP refused")
            except (smtplib.SMTPException, OSError):
                self._drop()
        if self._conn is None:
            self._conn = self._connect(deadline)
        return self._conn

    def send(self, message: OutgoingMessage) -> str:
        if not message.recipient_email.isascii():
            # Would need SMTPUTF8, which not every relay offers; refused rather than mangled.
            raise PermanentSendError("recipient address is not ASCII (SMTPUTF8 is not used)", "smtp_address")
        try:
            data = build_email(message, self.sender).as_bytes()
        except (ValueError, TypeError) as exc:  # e.g. a header that cannot be encoded
            raise PermanentSendError(f"message cannot be built: {exc}", "smtp_message") from exc
        deadline = Deadline.after(self.timeout)
        try:
            conn = self._connection(deadline)
            with cut_off_at(conn.sock, deadline):
                self._transfer(conn, message, data)
        except smtplib.SMTPDataError as exc:
            self._rset()
            text = f"SMTP {exc.smtp_code} on DATA: {_smtp_text(exc.smtp_error)}"
            if 500 <= exc.smtp_code < 600:
                raise PermanentSendError(text, f"smtp_{exc.smtp_code}") from exc
            raise TransientSendError(text, f"smtp_{exc.smtp_code}", affects_all=exc.smtp_code == 421) from exc
        except smtplib.SMTPResponseException as exc:  # connect / EHLO / STARTTLS / AUTH answered with an error
            self._drop()
            raise TransientSendError(f"SMTP {exc.smtp_code}: {_smtp_text(exc.smtp_error)}",
                                     f"smtp_{exc.smtp_code}", affects_all=True) from exc
        except (socket.timeout, TimeoutError) as exc:  # an operation's timeout, or the total deadline
            self._drop()
            raise TransientSendError(f"SMTP: no answer within {self.timeout:g}s", "timeout",
                                     affects_all=True) from exc
        except (smtplib.SMTPException, OSError) as exc:  # refused, reset, disconnected, TLS failure
            self._drop()
            raise TransientSendError(f"SMTP connection failed: {type(exc).__name__}: {exc}", "connect_error",
                                     affects_all=True) from exc
        self._last_used = time.monotonic()
        return message.message_id

    def _transfer(self, conn: smtplib.SMTP, message: OutgoingMessage, data: bytes) -> None:
        """MAIL FROM, RCPT TO and DATA on an open connection; a refusal raises its classification."""
        code, reply = conn.mail(self.sender)
        if code != 250:
            self._rset()
            # Our sender refused: a configuration problem, not this message's fault.
            raise TransientSendError(f"SMTP {code} on MAIL FROM: {_smtp_text(reply)}", f"smtp_{code}",
                                     affects_all=True)
        code, reply = conn.rcpt(message.recipient_email)
        if code not in (250, 251):
            self._rset()
            if 500 <= code < 600:
                raise PermanentSendError(f"SMTP {code} on RCPT TO: {_smtp_text(reply)}", f"smtp_{code}")
            raise TransientSendError(f"SMTP {code} on RCPT TO: {_smtp_text(reply)}", f"smtp_{code}",
                                     affects_all=code == 421)
        code, reply = conn.data(data)
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)

    def _rset(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._quietly_close(self._conn)
            self._conn = None

    @staticmethod
    def _quietly_close(conn: smtplib.SMTP) -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()


# --- webhook --------------------------------------------------------------------------------

def sign_body(body: bytes, secret: str) -> str:
    """The older ``X-Signature`` header value: ``sha256=`` + HMAC-SHA256 of the raw body, hex (kept
    for receivers built on it; the Standard Webhooks headers are the current form)."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookBackend(NotificationBackend):
    """An HTTP POST of the JSON payload, signed with Standard Webhooks (``webhook-id`` is the
    idempotency key) and the older ``X-Signature``, with an ``Idempotency-Key`` the receiver dedupes by.

    The provider is the operator's own choice (``NOTIFY_WEBHOOK_URL``), so its name is resolved as
    usual; the attempt ends by ``NOTIFY_WEBHOOK_TIMEOUT_SECONDS`` and reads at most 64 KiB of answer.
    """

    name = "webhook"

    def __init__(self, settings: Settings):
        if not settings.notify_webhook_url:
            raise BackendConfigError("NOTIFY_WEBHOOK_URL is not set; set it or choose another NOTIFY_BACKEND")
        if not settings.notify_webhook_secret:
            raise BackendConfigError("NOTIFY_WEBHOOK_SECRET is not set; the receiver could not verify the signature")
        self.url = settings.notify_webhook_url
        self.secret = settings.notify_webhook_secret
        self.timeout = settings.notify_webhook_timeout_seconds

    def send(self, message: OutgoingMessage) -> str:
        body = json.dumps(message.payload(), sort_keys=True, separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": message.idempotency_key,
            **standard_webhook_headers([self.secret], message.idempotency_key, int(time.time()), body),
            "X-Signature": sign_body(body, self.secret),
        }
        try:
            answer = post(self.url, body, headers, Deadline.after(self.timeout))
        except CallFailed as failed:
            raise TransientSendError(f"webhook: {failed.reason}", "timeout" if failed.timed_out else "connect_error",
                                     affects_all=True) from None
        status = answer.status
        if 200 <= status < 300:
            return self._provider_id(answer) or message.idempotency_key
        reason = f"HTTP {status}: {answer.text(200)}".rstrip(": ")
        if status in (408, 425, 429) or status >= 500:
            raise TransientSendError(reason, f"http_{status}",
                                     retry_after=parse_retry_after(answer.headers.get("retry-after")),
                                     affects_all=True)
        raise PermanentSendError(reason, f"http_{status}")

    @staticmethod
    def _provider_id(answer: Answer) -> str | None:
        try:
            document = json.loads(answer.body) if not answer.truncated else None
        except ValueError:
            document = None
        if isinstance(document, dict) and document.get("id") not in (None, ""):
            return str(document["id"])[:300]
        request_id = answer.headers.get("x-request-id")
        return request_id[:300] if request_id else None


def make_backend(settings: Settings) -> NotificationBackend:
    """The backend ``NOTIFY_BACKEND`` names; raises :class:`BackendConfigError` if it is incomplete."""
    if settings.notify_backend == "smtp":
        return SmtpBackend(settings)
    if settings.notify_backend == "webhook":
        return WebhookBackend(settings)
    return ConsoleBackend(settings.notify_console_path)
