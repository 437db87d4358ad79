"""Per-organization waits and lags: measured where the wait ends, added up in Redis, served by ``/metrics``.

A worker observes a wait at the moment it ends (a unit claimed: how long it was runnable; a job
started: how long it was queued; a notification sent: how long since it was written; a webhook
event delivered: how long since the job's state changed; a rate-limit reservation: how long the
sender must wait) and adds it to a histogram kept in Redis hashes, one pipelined round trip per
observation group. The API's collector (``producer/metrics.py``) reads the hashes at scrape time,
so every API instance serves the same values, a worker restart loses nothing and retention of
ledger rows moves nothing; the buckets only grow (a counter reset only if Redis loses its data).

**The organization label stays bounded**: the first ``METRICS_ORGANIZATION_LABELS`` (20)
organizations observed get a label value of their own, their id, for good (a Redis set, decided
by one Lua script so concurrent workers never exceed the cap); every other organization is
counted under ``organization="other"``. A value never moves from one series to another, so rates
stay right. Deleting the key ``progress_reset:metrics:organizations`` (and restarting the workers,
which remember the answer) starts the choice again.

Without Redis (the embedded default) nothing is recorded. A Redis error loses the observation,
never the work: it is logged once per process and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from models.logs import log_event
from models.settings import Settings, get_settings
from models.states import DeliveryStatus
from models.times import as_utc, parse_instant, utcnow

KEY_PREFIX = "progress_reset:metrics"
ORGANIZATIONS_KEY = f"{KEY_PREFIX}:organizations"
OTHER = "other"

# KEYS[1]: the set of labelled organizations; ARGV: organization id, cap. 1: it has its own label.
_LABEL_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

_MINUTES = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


@dataclass(frozen=True)
class Histogram:
    name: str  # without the progress_reset_ prefix
    help: str
    buckets: tuple[float, ...]
    by_organization: bool = True

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}:{self.name}"


UNIT_WAIT = Histogram("unit_wait_seconds", "Time a unit of reset work (learner batch, purge chunk) was runnable "
                      "before a worker claimed it.", (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
JOB_START_WAIT = Histogram("job_start_wait_seconds", "Time from a job's confirm to its start by a worker.",
                           (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
NOTIFICATION_LAG = Histogram("notification_lag_seconds", "Time from a notification's outbox row to its sending.",
                             _MINUTES)
WEBHOOK_LAG = Histogram("webhook_delivery_lag_seconds", "Time from a job event to its delivery to an endpoint.",
                        _MINUTES)
RATE_LIMIT_WAIT = Histogram("notification_rate_limit_wait_seconds",
                            "Wait for the first slot of each notification rate-limit reservation (one shared "
                            "limiter, so no organization label).",
                            (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), by_organization=False)
HISTOGRAMS = (UNIT_WAIT, JOB_START_WAIT, NOTIFICATION_LAG, WEBHOOK_LAG, RATE_LIMIT_WAIT)

WEBHOOK_ATTEMPTS = "webhook_delivery_attempts"
WEBHOOK_ATTEMPTS_KEY = f"{KEY_PREFIX}:{WEBHOOK_ATTEMPTS}"
WEBHOOK_OUTCOMES = (DeliveryStatus.DELIVERED, DeliveryStatus.PENDING, DeliveryStatus.FAILED)  # pending: retried


class _Recorder:
    """The process's Redis connection and its memory of which organizations have a label."""

    def __init__(self, settings: Settings):
        import redis

        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.label_script = self.client.register_script(_LABEL_LUA)
        self.cap = settings.metrics_organization_labels
        self.labels: dict[int, str] = {}
        self.warned = False

    def label(self, organization_id: int | None) -> str:
        if organization_id is None:
            return OTHER
        label = self.labels.get(organization_id)
        if label is None:
            own = self.label_script(keys=[ORGANIZATIONS_KEY], args=[organization_id, self.cap])
            label = self.labels[organization_id] = str(organization_id) if own else OTHER
        return label


_recorders: dict[tuple, _Recorder] = {}
_lock = threading.Lock()


def _recorder(settings: Settings) -> _Recorder | None:
    if not settings.redis_url:
        return None
    key = (settings.redis_url, settings.metrics_organization_labels, os.getpid())
    with _lock:
        if key not in _recorders:
            _recorders[key] = _Recorder(settings)
        return _recorders[key]


def _bucket(histogram: Histogram, seconds: float) -> str:
    index = bisect_left(histogram.buckets, seconds)
    return "+Inf" if index == len(histogram.buckets) else repr(float(histogram.buckets[index]))


def observe(histogram: Histogram, observations: Iterable[tuple[int | None, float]],
            settings: Settings | None = None) -> None:
    """Add ``(organization id, seconds)`` observations to ``histogram``, in one round trip."""
    observations = list(observations)
    recorder = _recorder(settings or get_settings())
    if recorder is None or not observations:
        return
    try:
        counts: dict[str, int] = defaultdict(int)
        sums: dict[str, float] = defaultdict(float)
        for organization_id, seconds in observations:
            label = recorder.label(organization_id) if histogram.by_organization else ""
            seconds = max(0.0, float(seconds))
            counts[f"{label}|{_bucket(histogram, seconds)}"] += 1
            sums[f"{label}|sum"] += seconds
        pipe = recorder.client.pipeline(transaction=False)
        for field, count in counts.items():
            pipe.hincrby(histogram.key, field, count)
        for field, total in sums.items():
            pipe.hincrbyfloat(histogram.key, field, total)
        pipe.execute()
    except Exception as exc:  # metrics never stop the work
        _warn_once(recorder, exc)


def since(then: datetime | str | None, now: datetime | None = None) -> float:
    """Seconds from ``then`` (an instant or its ISO text) to ``now``; 0 when unknown."""
    then = parse_instant(then, "instant")
    return max(0.0, ((now or utcnow()) - as_utc(then)).total_seconds()) if then is not None else 0.0


def observe_webhook_attempt(event: dict, status: str, settings: Settings | None = None) -> str:
    """Count one delivery attempt's outcome (``status`` from recording it) for the event's organization,
    and its lag when delivered. Returns ``status``, so the call can wrap the recording in one line."""
    recorder = _recorder(settings or get_settings())
    if recorder is None or status not in WEBHOOK_OUTCOMES:
        return status
    organization_id = event.get("organization_id")
    try:
        recorder.client.hincrby(WEBHOOK_ATTEMPTS_KEY, f"{recorder.label(organization_id)}|{status}", 1)
    except Exception as exc:
        _warn_once(recorder, exc)
        return status
    if status == DeliveryStatus.DELIVERED:
        observe(WEBHOOK_LAG, [(organization_id, since(event.get("created_at")))], settings)
    return status


def _warn_once(recorder: _Recorder, exc: Exception) -> None:
    if not recorder.warned:
        recorder.warned = True
        log_event("metrics.observe.failed", logging.WARNING, error=type(exc).__name__)


# --- reading (the API's collector) --------------------------------------------------------------

@dataclass
class HistogramValues:
    """One histogram's series: per label, cumulative ``(le, count)`` buckets and the sum."""

    histogram: Histogram
    series: dict[str, tuple[list[tuple[str, int]], float]]


def read_all(settings: Settings) -> tuple[list[HistogramValues], dict[tuple[str, str], int]] | None:
    """Every histogram and the webhook attempt counts, read from Redis; None without Redis.
    Raises the Redis error when it cannot be read (the scrape reports the broker down)."""
    if not settings.redis_url:
        return None
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        return read_histograms(client), read_webhook_attempts(client)
    finally:
        client.close()


def read_histograms(client) -> list[HistogramValues]:
    """Every histogram as its buckets, read from Redis (``client``: a redis.Redis)."""
    out = []
    pipe = client.pipeline(transaction=False)
    for histogram in HISTOGRAMS:
        pipe.hgetall(histogram.key)
    for histogram, raw in zip(HISTOGRAMS, pipe.execute()):
        fields: dict[str, dict[str, float]] = defaultdict(dict)
        for field, value in raw.items():
            label, _, part = field.decode().rpartition("|")
            fields[label][part] = float(value)
        series = {}
        for label, parts in sorted(fields.items()):
            cumulative, running = [], 0
            for bound in [*(repr(float(b)) for b in histogram.buckets), "+Inf"]:
                running += int(parts.get(bound, 0))
                cumulative.append((bound, running))
            series[label] = (cumulative, parts.get("sum", 0.0))
        out.append(HistogramValues(histogram, series))
    return out


def read_webhook_attempts(client) -> dict[tuple[str, str], int]:
    """``{(organization label, outcome): attempts}`` from Redis."""
    out = {}
    for field, value in client.hgetall(WEBHOOK_ATTEMPTS_KEY).items():
        label, _, outcome = field.decode().rpartition("|")
        out[(label, outcome)] = int(value)
    return out
