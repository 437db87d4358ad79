"""An HTTP POST out of the system: one total deadline, a bounded answer, the checked address.

:func:`post` sends a request and returns the status, the headers and at most
:data:`~tasks.outbound.deadline.MAX_ANSWER_BYTES` of the answer's body, all within its
:class:`~tasks.outbound.deadline.Deadline`; the rest of a larger answer is never read. It is
built on httpcore (the engine under httpx) because httpcore takes a *network backend*, the one
place every connect, read and write passes through:

- each of them gets the time left before the deadline as its timeout, so a receiver that
  trickles its answer a byte at a time is cut off at the deadline, not after it;
- a host with *pinned* addresses (a tenant's receiver, already checked by
  :mod:`models.receiver_urls`) is connected to at exactly those addresses, never resolved again,
  so a name that changes its answer between the check and the connection gets nowhere. TLS
  still verifies the certificate against the host's name.

Redirects are not followed. Connections are kept per thread and reused while they are healthy.
"""

from __future__ import annotations

import ssl
import threading
import typing
from contextvars import ContextVar
from dataclasses import dataclass

import certifi
import httpcore

from models.tracing import client_span
from tasks.outbound.deadline import MAX_ANSWER_BYTES, Deadline, DeadlinePassed

_deadline: ContextVar[Deadline | None] = ContextVar("outbound_deadline", default=None)
_pins: ContextVar[dict[str, list[str]]] = ContextVar("outbound_pins", default={})
_local = threading.local()


class CallFailed(Exception):
    """No answer: the deadline passed (``timed_out``), or the connection failed or was refused."""

    def __init__(self, reason: str, timed_out: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes  # at most MAX_ANSWER_BYTES
    truncated: bool  # the answer was longer; the rest was not read

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


def _clamped(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    try:
        return deadline.clamp(timeout)
    except DeadlinePassed as exc:
        raise expired(str(exc)) from None


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation ends by the current call's deadline."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _clamped(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, with the deadline on every operation and pinned addresses."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable | None = None) -> httpcore.NetworkStream:
        addresses = _pins.get().get(host) or [host]
        failure: Exception | None = None
        for address in addresses:
            try:
                stream = self._inner.connect_tcp(address, port, _clamped(timeout, httpcore.ConnectTimeout),
                                                 local_address, socket_options)
                return _DeadlineStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure  # type: ignore[misc] - addresses is never empty

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used for calls out")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _pool() -> httpcore.ConnectionPool:
    """This thread's connection pool (connections are reused by the calls of one sender thread)."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = httpcore.ConnectionPool(ssl_context=ssl.create_default_context(cafile=certifi.where()),
                                       max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0,
                                       retries=0, network_backend=_DeadlineBackend())
        _local.pool = pool
    return pool


def post(url: str, body: bytes, headers: dict[str, str], deadline: Deadline,
         pinned: dict[str, list[str]] | None = None) -> Answer:
    """POST ``body`` to ``url`` and read at most ``MAX_ANSWER_BYTES`` of the answer, by ``deadline``.

    ``pinned`` maps a host name to the addresses it may be reached at. Raises :class:`CallFailed`
    when there is no answer in time or no connection; any answer, whatever its status, is returned.
    """
    deadline_token = _deadline.set(deadline)
    pins_token = _pins.set(pinned or {})
    left = deadline.remaining()
    timeouts = {"connect": left, "read": left, "write": left, "pool": left}
    try:
        with client_span("POST", url) as call, _pool().stream(
                "POST", url, headers=list({**headers, **call.headers}.items()), content=body,
                extensions={"timeout": timeouts}) as response:
            call.answered(response.status)
            received = bytearray()
            truncated = False
            for chunk in response.iter_stream():
                received += chunk
                if len(received) > MAX_ANSWER_BYTES:
                    truncated = True
                    break
            return Answer(response.status,
                          {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers},
                          bytes(received[:MAX_ANSWER_BYTES]), truncated)
    except httpcore.TimeoutException:
        raise CallFailed(f"no complete answer within {deadline.seconds:g}s", timed_out=True) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
        raise CallFailed(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        _pins.reset(pins_token)
        _deadline.reset(deadline_token)
