"""``/metrics``: Prometheus text that parses, with values read from the ledger tables and the broker.

Tier (a): the snapshot against rows in a rolled-back transaction; the wait and lag histograms
against the test Redis. Tier (c): a real server and a real worker, scraped before, during and
after a reset.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import redis

from models import lag_metrics
from models.lag_metrics import RATE_LIMIT_WAIT, UNIT_WAIT, observe, observe_webhook_attempt, read_all
from models.schema import Notification, ResetBatch, ResetJob
from models.settings import get_settings
from models.states import BatchState
from models.times import iso, utcnow
from models.training import create_organization
from producer.metrics import Snapshot, lag_metrics as lag_families, read_snapshot, snapshot_metrics
from tests.test_http_api import api_env, start_api, tenants, wait_for_state  # noqa: F401 - fixtures

QUEUES = ("resets", "reset_batches", "notifications", "maintenance")


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class _Fixed:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def test_snapshot_reads_states_counts_and_ages_from_rows(db_session):
    now = utcnow()
    org = create_organization(db_session, "Metrics org")
    before = read_snapshot(db_session, now)
    queued = ResetJob(id=uuid.uuid4(), organization_id=org.id, course_id=1, scope="course", state="queued",
                      actor_id=1, created_at=now - timedelta(seconds=300), confirmed_at=now - timedelta(seconds=120),
                      learners_done=0, cleared={})
    running = ResetJob(id=uuid.uuid4(), organization_id=org.id, course_id=2, scope="course", state="running",
                       actor_id=1, created_at=now - timedelta(seconds=90), heartbeat_at=now - timedelta(seconds=45),
                       learners_done=7, cleared={})
    db_session.add_all([queued, running])
    db_session.flush()
    db_session.add_all([
        ResetBatch(job_id=running.id, batch_no=1, lo_user_id=0, hi_user_id=10, state="done", learners_reset=7),
        ResetBatch(job_id=running.id, batch_no=2, lo_user_id=10, hi_user_id=20, state="dead"),
        ResetBatch(job_id=running.id, batch_no=3, lo_user_id=20, hi_user_id=30, state="pending"),
        Notification(user_id=1, course_id=2, reset_job_id=running.id, status="pending",
                     created_at=now - timedelta(seconds=60)),
        Notification(user_id=2, course_id=2, reset_job_id=running.id, status="sent", created_at=now),
    ])
    db_session.flush()

    snap = read_snapshot(db_session, now)
    assert snap.jobs["queued"] == before.jobs["queued"] + 1
    assert snap.jobs["running"] == before.jobs["running"] + 1
    assert snap.learners_reset == before.learners_reset + 7
    for state, extra in (("done", 1), ("dead", 1), ("pending", 1), ("running", 0)):
        assert snap.batches[state] == before.batches[state] + extra
    assert snap.notifications["pending"] == before.notifications["pending"] + 1
    assert snap.notifications["sent"] == before.notifications["sent"] + 1
    assert snap.oldest_queued_job_age >= 120 - 1e-6
    assert snap.oldest_running_heartbeat_age >= 45 - 1e-6
    assert snap.oldest_pending_notification_age >= 60 - 1e-6

    registry = CollectorRegistry()
    registry.register(_Fixed(snapshot_metrics(snap)))
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "progress_reset_batches_dead_total") == snap.batches["dead"]
    assert value(samples, "progress_reset_learners_reset_total") == snap.learners_reset
    assert value(samples, "progress_reset_jobs", state="queued") == snap.jobs["queued"]
    assert value(samples, "progress_reset_oldest_queued_job_age_seconds") == snap.oldest_queued_job_age
    assert {dict(k[1]).get("state") for k in samples if k[0] == "progress_reset_batches"} >= {str(s) for s in BatchState}


def test_an_empty_snapshot_renders_zeros():
    registry = CollectorRegistry()
    registry.register(_Fixed(snapshot_metrics(Snapshot())))
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "progress_reset_learners_reset_total") == 0
    assert value(samples, "progress_reset_oldest_pending_notification_age_seconds") == 0


@pytest.mark.e2e
def test_metrics_parse_and_counters_move_during_a_reset(api_env, tenants, start_api,  # noqa: F811
                                                        celery_worker_proc):
    a = tenants.a
    celery_worker_proc(api_env, concurrency=2, name="metrics")
    server = start_api(api_env)
    with server.client(a.key) as api:
        before = scrape(api)
        for queue in QUEUES:
            assert value(before, "progress_reset_queue_length", queue=queue) >= 0
        assert value(before, "progress_reset_database_up") == 1
        assert value(before, "progress_reset_broker_up") == 1
        assert value(before, "progress_reset_broker_unacked") >= 0

        req = api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": a.course_ids[0]}).json()
        learners, to_notify = req["summary"]["learners"], req["summary"]["learners_to_notify"]
        assert learners > 0 and to_notify > 0
        with_request = scrape(api)
        assert (value(with_request, "progress_reset_jobs", state="awaiting_confirmation")
                == value(before, "progress_reset_jobs", state="awaiting_confirmation") + 1)

        confirmed = api.post(f"/v1/resets/{req['request_id']}/confirm",
                             json={"actor_id": a.admin_id, "token": req["token"]})
        assert confirmed.status_code == 202, confirmed.text
        # Scrape while the job runs: every counter only ever moves forward.
        seen = [with_request]
        deadline = time.monotonic() + 60
        while True:
            seen.append(scrape(api))
            st = api.get(f"/v1/resets/{req['request_id']}").json()
            if st["state"] == "succeeded" and st["notifications"]["sent"] == to_notify:
                break
            assert st["state"] not in ("failed", "cancelled"), st
            assert time.monotonic() < deadline, f"reset or its notifications not done: {st}"
            time.sleep(0.1)
        after = scrape(api)
        seen.append(after)

    counters = ("progress_reset_learners_reset_total", "progress_reset_batches_done_total",
                "progress_reset_notifications_sent_total", "progress_reset_batches_dead_total")
    for name in counters:
        values = [value(s, name) for s in seen]
        assert values == sorted(values), (name, values)
    assert value(after, "progress_reset_learners_reset_total") == value(before, "progress_reset_learners_reset_total") + learners
    assert value(after, "progress_reset_batches_done_total") >= value(before, "progress_reset_batches_done_total") + 2
    assert (value(after, "progress_reset_notifications_sent_total")
            == value(before, "progress_reset_notifications_sent_total") + to_notify)
    assert value(after, "progress_reset_jobs", state="succeeded") == value(before, "progress_reset_jobs",
                                                                            state="succeeded") + 1
    assert value(after, "progress_reset_batches_dead_total") == 0
    assert value(after, "progress_reset_notifications_pending") == 0
    assert value(after, "progress_reset_oldest_queued_job_age_seconds") == 0
    assert value(after, "progress_reset_http_requests_total", method="POST", route="/v1/resets", status="201") == 1
    # Per-organization waits and lags, measured by the worker: one observation per unit, per job
    # start and per notification sent.
    org = str(a.organization_id)
    assert value(after, "progress_reset_unit_wait_seconds_count", organization=org) == st["batches_total"] >= 2
    assert value(after, "progress_reset_job_start_wait_seconds_count", organization=org) == 1
    assert value(after, "progress_reset_notification_lag_seconds_count", organization=org) == to_notify
    assert value(after, "progress_reset_notification_lag_seconds_sum", organization=org) > 0
    assert value(after, "progress_reset_notification_rate_limit_wait_seconds_count") >= 1
    # No label carries a course or learner id, nor an unbounded organization id (models.lag_metrics).
    label_names = {name for (_sample, labels) in after for name, _ in labels}
    assert label_names <= {"state", "status", "queue", "method", "route", "le", "organization", "outcome"}


def test_waits_add_up_in_redis_and_the_organization_label_stays_bounded(use_env, redis_url):
    use_env(REDIS_URL=redis_url, METRICS_ORGANIZATION_LABELS="2")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    lag_metrics._recorders.clear()
    observe(UNIT_WAIT, [(101, 0.03), (102, 0.7), (103, 4000.0), (101, 0.3)])
    observe(UNIT_WAIT, [(104, 1.0), (101, 0.04)])
    observe(RATE_LIMIT_WAIT, [(None, 0.02)])
    assert client.smembers(lag_metrics.ORGANIZATIONS_KEY) == {b"101", b"102"}  # the first two, for good
    ten_seconds_ago = iso(utcnow() - timedelta(seconds=10))
    observe_webhook_attempt({"organization_id": 102, "created_at": ten_seconds_ago}, "delivered")
    observe_webhook_attempt({"organization_id": 105, "created_at": ten_seconds_ago}, "pending")
    assert observe_webhook_attempt({"organization_id": 102, "created_at": ten_seconds_ago}, "stale") == "stale"

    registry = CollectorRegistry()
    registry.register(_Fixed(lag_families(*read_all(get_settings()))))
    samples = parse(generate_latest(registry).decode())
    bucket = "progress_reset_unit_wait_seconds_bucket"
    assert value(samples, bucket, organization="101", le="0.05") == 2
    assert value(samples, bucket, organization="101", le="0.5") == 3
    assert value(samples, "progress_reset_unit_wait_seconds_count", organization="101") == 3
    assert value(samples, "progress_reset_unit_wait_seconds_sum", organization="101") == pytest.approx(0.37)
    assert value(samples, bucket, organization="other", le="900.0") == 1  # 104's second
    assert value(samples, bucket, organization="other", le="+Inf") == 2  # and 103's hour
    assert not [key for key in samples if ("organization", "103") in key[1] or ("organization", "104") in key[1]]
    assert value(samples, "progress_reset_notification_rate_limit_wait_seconds_count") == 1
    assert value(samples, "progress_reset_webhook_delivery_lag_seconds_count", organization="102") == 1
    assert 10 <= value(samples, "progress_reset_webhook_delivery_lag_seconds_sum", organization="102") < 20
    assert value(samples, "progress_reset_webhook_delivery_attempts_total", organization="102",
                 outcome="delivered") == 1
    assert value(samples, "progress_reset_webhook_delivery_attempts_total", organization="other",
                 outcome="pending") == 1


def test_every_metric_on_the_dashboard_is_served(fresh_db, use_env, redis_url):
    """docs/observability/progress-reset-dashboard.json is built on what /metrics serves."""
    import json
    import re
    from pathlib import Path

    from fastapi.testclient import TestClient

    from producer.http.app import create_app

    use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url)
    with TestClient(create_app()) as client:
        client.get("/healthz")
        text = client.get("/metrics").text
    served = {family.name for family in text_string_to_metric_families(text)}
    dashboard = Path(__file__).resolve().parent.parent / "docs" / "observability" / "progress-reset-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])]
    names = [name for expr in exprs for name in re.findall(r"progress_reset_\w+", expr)]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in names}
    assert len(used) >= 15 and not used - served, sorted(used - served)


def test_dead_batches_lists_what_each_dead_letter_left_undone(db_session):
    from sqlalchemy import select, update

    from models.batches import dead_batch_report
    from models.schema import CourseAssignment
    from models.seed import seed

    org = seed(db_session, learners=30, lessons=3, courses=1, completed_ratio=0.5, random_seed=2)
    course = org.course_ids[0]
    a = CourseAssignment.__table__.c
    with_progress = db_session.scalars(select(a.user_id).where(a.course_id == course, a.status != "not_started")
                                       .order_by(a.user_id)).all()
    assert len(with_progress) >= 3
    job = ResetJob(id=uuid.uuid4(), organization_id=org.organization_id, course_id=course, scope="course",
                   state="failed", actor_id=org.admin_id, created_at=utcnow(), cleared={})
    db_session.add(job)
    db_session.flush()
    lo, hi = with_progress[0] - 1, with_progress[-1]
    db_session.add_all([
        ResetBatch(job_id=job.id, batch_no=1, kind="learners", lo_user_id=lo, hi_user_id=hi, state="dead",
                   attempts=5, error="dead-lettered after 5 attempts: boom", finished_at=utcnow()),
        ResetBatch(job_id=job.id, batch_no=2, kind="purge", component="lesson_progress", cursor_row_id=100,
                   hi_row_id=900, lo_user_id=0, hi_user_id=2**31 - 1, state="dead", attempts=5, error="x",
                   finished_at=utcnow()),
    ])
    # One learner of the range was reset by this job before the batch died: not listed.
    db_session.execute(update(CourseAssignment).where(CourseAssignment.course_id == course,
                                                      CourseAssignment.user_id == with_progress[0])
                       .values(last_reset_job_id=job.id))
    db_session.flush()

    found = {b["batch_no"]: b for b in dead_batch_report(db_session, str(job.id))}
    assert found[1]["learners_not_reset"] == with_progress[1:]
    assert found[1]["error"].endswith("boom") and found[1]["course_id"] == course
    assert found[2]["manual_sql"] == (f"DELETE FROM lesson_progress WHERE course_id = {course} AND id > 100 "
                                      f"AND id <= 900 AND NOT (user_id > {lo} AND user_id <= {hi});")
