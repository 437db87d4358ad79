"""A total deadline for one call out of the system, and what enforces it on a plain socket.

Per-operation timeouts do not bound a call: a receiver that sends one byte every two seconds
never trips a five-second read timeout, and holds the caller for as long as it likes. Every call
out therefore carries one :class:`Deadline` for connect, send and the whole answer together.
HTTP calls clamp every socket operation to the time left (:mod:`tasks.outbound.http`); a client
library that owns its socket (SMTP) is cut off by :func:`cut_off_at`, which shuts the socket down
when the deadline passes, waking whatever operation is blocked on it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# An answer is read up to this many bytes; the rest is never read (the connection is closed).
MAX_ANSWER_BYTES = 64 * 1024


class DeadlinePassed(TimeoutError):
    """The call's total deadline passed before it ended."""


@dataclass(frozen=True)
class Deadline:
    """The moment (``time.monotonic()``) by which a call must have ended, and its length."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - time.monotonic())

    def clamp(self, timeout: float | None) -> float:
        """``timeout`` shortened to the time left; raises :class:`DeadlinePassed` when none is left."""
        left = self.remaining()
        if left <= 0:
            raise DeadlinePassed(f"no answer within {self.seconds:g}s")
        return left if timeout is None else min(timeout, left)


@contextmanager
def cut_off_at(sock: socket.socket | None, deadline: Deadline) -> Iterator[None]:
    """Shut ``sock`` down when ``deadline`` passes, unless the block ended first.

    A shutdown wakes a thread blocked in ``recv``/``send`` on the socket at once (closing it
    would not), so the call fails with an ``OSError`` right at the deadline.
    """
    if sock is None:
        yield
        return
    fired = threading.Event()

    def shut() -> None:
        fired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    timer = threading.Timer(deadline.remaining(), shut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except OSError as exc:
        if fired.is_set():
            raise DeadlinePassed(f"no answer within {deadline.seconds:g}s") from exc
        raise
    finally:
        timer.cancel()
