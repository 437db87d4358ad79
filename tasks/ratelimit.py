"""One send rate shared by every notification worker (GCRA with reservations).

Hand-written because no maintained library (limits, throttled-py, pyrate-limiter) reserves future
slots to sleep to, nor keeps one GCRA bucket in Redis with a ``flock``-ed file as the embedded fallback.

The limiter hands out *send slots* spaced ``1 / rate`` seconds apart; with ``burst`` above 1, up
to ``burst`` of them may fall at once. This is GCRA (the generic cell rate algorithm) keeping a
single number per bucket, the theoretical arrival time (TAT) of the next slot. A caller
reserves ``count`` (at most ``burst``) slots at once and learns when it may send all of them
together:

    send at  = max(TAT, now) + (count - burst) * interval   # (or now, if that is earlier)
    new TAT  = max(TAT, now) + count * interval

so over any window of ``T`` seconds at most ``burst + T * rate`` sends start, however many
processes or hosts share the bucket. A reservation is a promise about the future: the caller
does not wait for it in a worker slot, it schedules its sends for then (see
:mod:`tasks.notifications.sending`), so many callers line up their groups one after another
instead of waking together.

Where the bucket lives:

- ``settings.redis_url`` set (production; it defaults to the Redis broker): a
  key per backend in Redis, updated by one Lua script, so every worker on
  every host shares it, timed by the Redis server's clock.
- embedded default (no Redis): a small file under ``data_dir`` updated under
  an exclusive ``flock``: shared by every worker process on the machine, which
  is where the embedded filesystem broker's workers all run. Without ``fcntl``
  (Windows) the bucket is per process, and N worker processes may together
  send N times the rate; docs/notifications.md gives the arithmetic.

A slot that is reserved and then not used (the worker dies while waiting, or a
run stops before the end of its group) is simply lost: the limiter may run
below the rate, never above it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from models.lag_metrics import RATE_LIMIT_WAIT, observe
from models.settings import Settings

KEY_PREFIX = "progress_reset:ratelimit"

# KEYS[1]: bucket; ARGV: interval (us), burst, max wait (us), slots. Returns {granted, wait_us}
# (the wait until every one of the slots may be used at once).
# Uses the server's clock (TIME), so hosts with skewed clocks still share one rate;
# Redis 5+ replicates the script's effects, so TIME before a write is allowed.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local slots = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat + (slots - burst) * interval - now
if wait < 0 then wait = 0 end
if wait > max_wait then return {0, wait} end
local new_tat = tat + interval * slots
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, wait}
"""


class RateLimiterUnavailable(RuntimeError):
    """The shared bucket cannot be reached (Redis down): send nothing rather than too much."""


@dataclass(frozen=True)
class Reservation:
    """``granted``: a slot is held and starts in ``wait`` seconds. Otherwise the next
    slot is more than ``max_wait`` away; nothing was reserved; try again in ``wait``."""

    granted: bool
    wait: float


class RateLimiter:
    """Base: subclasses implement ``_reserve``; ``reserve`` calls it and observes the wait for
    ``/metrics`` (models/lag_metrics.py); ``acquire`` reserves and sleeps."""

    rate_per_second: float
    burst: int

    @property
    def interval(self) -> float:
        return 1.0 / self.rate_per_second

    def reserve(self, max_wait: float, count: int = 1) -> Reservation:
        """Reserve ``count`` (at most ``burst``) slots if they may all be used within ``max_wait``.

        The wait (granted or not) is observed for ``/metrics``: how long the group waits for its
        slots, in the future, never in a worker slot.
        """
        reservation = self._reserve(max_wait, count)
        observe(RATE_LIMIT_WAIT, [(None, reservation.wait)])
        return reservation

    def _reserve(self, max_wait: float, count: int) -> Reservation:  # pragma: no cover - abstract
        raise NotImplementedError

    def acquire(self, max_wait: float = 30.0) -> Reservation:
        """Wait for the next slot if it is at most ``max_wait`` away; returns the reservation.

        Raises :class:`RateLimiterUnavailable` when the shared bucket cannot be reached.
        """
        reservation = self.reserve(max_wait)
        if reservation.granted and reservation.wait > 0:
            time.sleep(reservation.wait)
        return reservation


def _gcra_step(tat: float, now: float, interval: float, burst: int, max_wait: float,
               count: int = 1) -> tuple[float, Reservation]:
    """The arithmetic shared by the local limiters (the Lua script is the same in microseconds)."""
    tat = max(tat, now)
    wait = max(0.0, tat + (count - burst) * interval - now)
    if wait > max_wait:
        return tat, Reservation(False, wait)
    return tat + interval * count, Reservation(True, wait)


class RedisRateLimiter(RateLimiter):
    """A bucket in Redis shared by every worker on every host."""

    def __init__(self, redis_url: str, key: str, rate_per_second: float, burst: int = 1):
        import redis

        self.rate_per_second = rate_per_second
        self.burst = max(1, burst)
        self.key = key
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._script = self._client.register_script(_GCRA_LUA)

    def _reserve(self, max_wait: float, count: int = 1) -> Reservation:
        import redis

        try:
            granted, wait_us = self._script(
                keys=[self.key],
                args=[max(1, round(self.interval * 1_000_000)), self.burst, round(max_wait * 1_000_000),
                      max(1, int(count))],
            )
        except redis.RedisError as exc:
            raise RateLimiterUnavailable(f"rate limiter at Redis unavailable: {type(exc).__name__}") from exc
        return Reservation(bool(granted), int(wait_us) / 1_000_000)


class FileRateLimiter(RateLimiter):
    """A bucket in a file, shared by every process on this machine through ``flock``."""

    def __init__(self, path: Path, rate_per_second: float, burst: int = 1):
        self.rate_per_second = rate_per_second
        self.burst = max(1, burst)
        self.path = Path(path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        # flock belongs to the open file description, which a forked child would
        # share with its parent: open the file afresh in each process.
        if self._fd is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def _reserve(self, max_wait: float, count: int = 1) -> Reservation:
        with self._lock:
            try:
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise RateLimiterUnavailable(f"rate limiter file {self.path} unusable: {exc.strerror}") from exc
            try:
                raw = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                try:
                    tat = float(raw) if raw else 0.0
                except ValueError:
                    tat = 0.0
                new_tat, reservation = _gcra_step(tat, time.time(), self.interval, self.burst, max_wait,
                                                  max(1, int(count)))
                if reservation.granted:
                    data = f"{new_tat:.6f}".encode().ljust(32)
                    os.pwrite(fd, data, 0)
                return reservation
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


class ProcessRateLimiter(RateLimiter):
    """A bucket in this process's memory (shared by its threads only)."""

    def __init__(self, rate_per_second: float, burst: int = 1):
        self.rate_per_second = rate_per_second
        self.burst = max(1, burst)
        self._tat = 0.0
        self._lock = threading.Lock()

    def _reserve(self, max_wait: float, count: int = 1) -> Reservation:
        with self._lock:
            self._tat, reservation = _gcra_step(self._tat, time.monotonic(), self.interval, self.burst, max_wait,
                                                max(1, int(count)))
            return reservation


_limiters: dict[tuple, RateLimiter] = {}
_limiters_lock = threading.Lock()


# A group of notifications is the rate of this many seconds: one reservation, one courier batch.
GROUP_SECONDS = 0.2


def notification_group_size(settings: Settings) -> int:
    """Notifications sent together under one reservation: the rate of ``GROUP_SECONDS``, at least
    one, at most ``NOTIFY_CHUNK_SIZE``. It is also the bucket's burst, so a group may go at once."""
    return max(1, min(settings.notify_chunk_size, round(settings.notify_rate_per_second * GROUP_SECONDS)))


def notification_rate_limiter(settings: Settings) -> RateLimiter:
    """The process's limiter for the configured notification backend (one bucket per backend)."""
    name = f"notify.{settings.notify_backend}"
    rate, burst = settings.notify_rate_per_second, notification_group_size(settings)
    if settings.redis_url:
        cache_key: tuple = ("redis", settings.redis_url, name, rate, burst)
    elif fcntl is not None:
        cache_key = ("file", str(settings.data_dir), name, rate, burst)
    else:  # pragma: no cover - Windows
        cache_key = ("process", name, rate, burst)
    with _limiters_lock:
        limiter = _limiters.get(cache_key)
        if limiter is None:
            if cache_key[0] == "redis":
                limiter = RedisRateLimiter(settings.redis_url, f"{KEY_PREFIX}:{name}", rate, burst)
            elif cache_key[0] == "file":
                limiter = FileRateLimiter(settings.data_dir / "ratelimit" / f"{name}.tat", rate, burst)
            else:  # pragma: no cover - Windows
                limiter = ProcessRateLimiter(rate, burst)
            _limiters[cache_key] = limiter
        return limiter
