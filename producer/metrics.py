"""Prometheus metrics of the reset system, served at ``/metrics`` by the HTTP producer.

Every value is read at scrape time from the ledger tables (and the broker), so
it is the same whichever process serves it, survives restarts, and needs no
push from the workers. Counters (``*_total``) are counts of rows that only
ever move forward (batches done, learners reset, notifications sent), so they
never go down. Labels carry states and queue names only: no course or
learner ids, no names. The per-organization wait and lag histograms are
measured by the workers and added up in Redis (:mod:`models.lag_metrics`,
which also says how the organization label stays bounded); they are read
from there at scrape time too.

``docs/operations.md`` explains each metric and the alert it feeds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from models.dialect import is_postgres
from models.lag_metrics import HistogramValues, read_all
from models.logs import log_event
from models.queues import QUEUES
from models.retention import retention_totals
from models.schema import Notification, ResetBatch, ResetJob, RetrainingCampaign, WebhookDelivery
from models.settings import get_settings
from models.states import BatchState, CampaignState, DeliveryStatus, JobState, NotificationStatus
from models.times import as_utc, utcnow

PREFIX = "progress_reset"
# A scrape never holds the database longer than this.
STATEMENT_TIMEOUT_MS = 5000


@dataclass
class Snapshot:
    """What one scrape read from the database."""

    jobs: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    learners_reset: int = 0
    notifications: dict[str, int] = field(default_factory=dict)
    campaigns: dict[str, int] = field(default_factory=dict)
    webhook_deliveries: dict[str, int] = field(default_factory=dict)
    oldest_queued_job_age: float = 0.0
    oldest_running_heartbeat_age: float = 0.0
    oldest_pending_notification_age: float = 0.0
    # Rows retention removed, ever, by kind: added to the counters, so they never go down.
    removed: dict[str, int] = field(default_factory=dict)


def _age(now: datetime, then: datetime | None) -> float:
    return max(0.0, (now - as_utc(then)).total_seconds()) if then is not None else 0.0


def _counts(session: Session, column, states: tuple[str, ...]) -> dict[str, int]:
    found = dict(session.execute(select(column, func.count()).group_by(column)).all())
    counts = {state: int(found.pop(state, 0)) for state in states}
    counts.update({str(k): int(v) for k, v in found.items()})  # a state this code does not know yet
    return counts


def read_snapshot(session: Session, now: datetime | None = None) -> Snapshot:
    """Read every database-backed metric in one transaction; never writes."""
    now = now or utcnow()
    j, b, n = ResetJob.__table__.c, ResetBatch.__table__.c, Notification.__table__.c
    snap = Snapshot()
    snap.jobs = _counts(session, j.state, tuple(JobState))
    snap.batches = _counts(session, b.state, tuple(BatchState))
    snap.learners_reset = int(session.scalar(select(func.coalesce(func.sum(j.learners_done), 0))) or 0)
    snap.notifications = _counts(session, n.status, tuple(NotificationStatus))
    snap.campaigns = _counts(session, RetrainingCampaign.__table__.c.state, tuple(CampaignState))
    snap.removed = retention_totals(session)
    snap.webhook_deliveries = _counts(session, WebhookDelivery.__table__.c.status, tuple(DeliveryStatus))
    snap.oldest_queued_job_age = _age(now, session.scalar(
        select(func.min(func.coalesce(j.confirmed_at, j.created_at))).where(j.state == JobState.QUEUED)))
    snap.oldest_running_heartbeat_age = _age(now, session.scalar(
        select(func.min(func.coalesce(j.heartbeat_at, j.started_at))).where(j.state == JobState.RUNNING)))
    snap.oldest_pending_notification_age = _age(now, session.scalar(
        select(func.min(n.created_at)).where(n.status.in_((NotificationStatus.PENDING, NotificationStatus.SENDING)))))
    return snap


def _gauge_by(name: str, doc: str, label: str, values: dict[str, int | float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def snapshot_metrics(snap: Snapshot) -> list:
    """The metric families of a database snapshot."""
    removed = snap.removed
    return [
        _gauge_by("jobs", "Reset jobs (and unconfirmed requests) by state.", "state", snap.jobs),
        _gauge_by("batches", "Reset batches by state.", "state", snap.batches),
        _counter("batches_done", "Batches that finished (learners reset and committed).",
                 snap.batches.get(BatchState.DONE, 0) + removed.get("batches_done", 0)),
        _counter("batches_dead", "Batches dead-lettered after using up their attempts.",
                 snap.batches.get(BatchState.DEAD, 0) + removed.get("batches_dead", 0)),
        _counter("learners_reset", "Learner resets applied by all jobs.",
                 snap.learners_reset + removed.get("learners_reset", 0)),
        _gauge_by("notifications", "Notification outbox rows by status.", "status", snap.notifications),
        _counter("notifications_sent", "Notifications sent.",
                 snap.notifications.get(NotificationStatus.SENT, 0) + removed.get("notifications_sent", 0)),
        _counter("notifications_failed", "Notifications given up after their attempts.",
                 snap.notifications.get(NotificationStatus.FAILED, 0) + removed.get("notifications_failed", 0)),
        _gauge("notifications_pending", "Notifications not sent yet (pending or being sent).",
               snap.notifications.get(NotificationStatus.PENDING, 0) + snap.notifications.get(NotificationStatus.SENDING, 0)),
        _gauge_by("campaigns", "Retraining campaigns by state.", "state", snap.campaigns),
        _gauge_by("webhook_deliveries", "Webhook delivery rows by status.", "status", snap.webhook_deliveries),
        _gauge("oldest_queued_job_age_seconds", "Age of the oldest confirmed job no worker has started (0: none).",
               snap.oldest_queued_job_age),
        _gauge("oldest_running_job_heartbeat_age_seconds",
               "Time since the least recent progress of a running job (0: none running).",
               snap.oldest_running_heartbeat_age),
        _gauge("oldest_pending_notification_age_seconds",
               "Age of the oldest notification not sent yet (0: none).", snap.oldest_pending_notification_age),
    ]


class ResetSystemCollector(Collector):
    """Reads the ledger tables and the broker on every scrape."""

    def collect(self):
        from models.db import session_scope
        from workers.health import malformed_messages, queue_lengths, redis_unacked

        started = time.perf_counter()
        settings = get_settings()
        database_up = 1
        try:
            with session_scope() as session:
                if is_postgres(session):
                    session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
                snap = read_snapshot(session)
            yield from snapshot_metrics(snap)
        except Exception as exc:
            database_up = 0
            log_event("metrics.database.failed", logging.WARNING, error=type(exc).__name__)
        yield _gauge("database_up", "1 when the metrics scrape could read the database.", database_up)

        broker_up = 1
        try:
            lengths = queue_lengths(settings, QUEUES)
            unacked = redis_unacked(settings)
            malformed = malformed_messages(settings, QUEUES)
        except Exception as exc:
            broker_up, lengths, unacked, malformed = 0, None, None, None
            log_event("metrics.broker.failed", logging.WARNING, error=type(exc).__name__)
        if lengths is not None:
            yield _gauge_by("queue_length", "Messages waiting in each broker queue (not yet delivered).", "queue",
                            lengths)
        if unacked is not None:
            yield _gauge("broker_unacked", "Messages delivered to workers and not acknowledged yet (in flight).",
                         unacked)
        if malformed is not None:
            total, kept = malformed
            if total is not None:
                family = CounterMetricFamily(f"{PREFIX}_broker_malformed_messages",
                                             "Messages a worker could not decode and moved to <queue>.malformed.",
                                             labels=["queue"])
                for queue, value in total.items():
                    family.add_metric([queue], value)
                yield family
            yield _gauge_by("broker_malformed_kept", "Undecodable messages kept in <queue>.malformed for inspection.",
                            "queue", kept)
        yield _gauge("broker_up", "1 when the metrics scrape could read the broker's queue lengths.", broker_up)
        try:
            lags = read_all(settings)
        except Exception as exc:
            lags = None
            log_event("metrics.lags.failed", logging.WARNING, error=type(exc).__name__)
        if lags is not None:
            yield from lag_metrics(*lags)
        yield _gauge("scrape_duration_seconds", "Time this scrape took to read the database and the broker.",
                     time.perf_counter() - started)


def lag_metrics(histograms: list[HistogramValues], attempts: dict[tuple[str, str], int]) -> list:
    """The families of the per-organization wait and lag histograms and the webhook attempt counts."""
    families = []
    for values in histograms:
        labels = ["organization"] if values.histogram.by_organization else []
        family = HistogramMetricFamily(f"{PREFIX}_{values.histogram.name}", values.histogram.help, labels=labels)
        for label, (buckets, total) in values.series.items():
            family.add_metric([label] if labels else [], buckets, total)
        families.append(family)
    family = CounterMetricFamily(f"{PREFIX}_webhook_delivery_attempts",
                                 "Webhook delivery attempts by outcome (delivered, pending: to be retried, failed).",
                                 labels=["organization", "outcome"])
    for (label, outcome), value in sorted(attempts.items()):
        family.add_metric([label, outcome], value)
    families.append(family)
    return families
