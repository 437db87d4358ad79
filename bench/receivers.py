"""Receivers that answer badly on purpose, on loopback: the benchmark's slow tenant and the tests'.

:class:`BadReceiver` is a raw HTTP/1.1 server (one thread per connection) that reads each request
whole and then, by ``mode``:

- ``trickle``: ``200`` with ``Content-Length: 100``, then one byte every ``every`` seconds;
- ``huge``: ``500`` with ``Content-Length`` of ``huge_bytes``, then the body as fast as it goes;
- ``hang``: the headers of a ``200`` with ``Content-Length: 10``, then nothing;
- ``slow_ok``: waits ``every`` seconds, then a complete ``200``.

It records every request: the ``webhook-id`` header, when it arrived, when the connection ended
and how many body bytes were written to it; and how many connections are open at once.
"""

from __future__ import annotations

import select
import socket
import socketserver
import threading
import time
from dataclasses import dataclass

HUGE_CHUNK = b"x" * 65536


@dataclass
class Request:
    message_id: str
    started: float
    ended: float | None = None
    written: int = 0


class BadReceiver:
    def __init__(self, mode: str, every: float = 2.0, huge_bytes: int = 400 * 1024 * 1024):
        self.mode, self.every, self.huge_bytes = mode, every, huge_bytes
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.open = 0
        self.most_open = 0
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                receiver._serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> "BadReceiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def got(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            self._read_and_answer(conn)
        finally:
            with self.lock:
                self.open -= 1

    def _read_and_answer(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        length = int(headers.get(b"Content-Length", b"0"))
        while len(body) < length:
            body += conn.recv(65536)
        record = Request(headers.get(b"webhook-id", b"").decode(), time.monotonic())
        with self.lock:
            self.requests.append(record)
        try:
            self._answer(conn, record)
        except OSError:
            pass  # the caller gave up (its deadline) and closed the connection
        finally:
            record.ended = time.monotonic()
            conn.close()

    def _answer(self, conn: socket.socket, record: Request) -> None:
        if self.mode == "trickle":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):
                conn.sendall(b"x")
                record.written += 1
                if _hung_up(conn, self.every):
                    return
        elif self.mode == "huge":
            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % self.huge_bytes)
            while record.written < self.huge_bytes:
                conn.sendall(HUGE_CHUNK)
                record.written += len(HUGE_CHUNK)
        elif self.mode == "hang":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            conn.settimeout(120)
            conn.recv(1)  # until the caller hangs up
        else:  # slow_ok
            time.sleep(self.every)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def _hung_up(conn: socket.socket, seconds: float) -> bool:
    """Wait ``seconds``, or less if the caller hangs up meanwhile (then True)."""
    readable, _, _ = select.select([conn], [], [], seconds)
    return bool(readable) and not conn.recv(1, socket.MSG_PEEK)


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes together (``VmRSS`` from /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
