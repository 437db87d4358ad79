"""Retention (models/retention.py): what goes, when, and what never does; status and audit stay true.

The history is made by the real pipeline's plain functions at a frozen instant, then the sweep
runs at later instants (freezegun). Each test of the plain functions runs on PostgreSQL and on
SQLite (``pipeline_db``); the CLI and the task on a database other processes can commit to.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select, update

from models.errors import NotFound
from models.job_status import describe_status
from models.jobs import get_job
from models.retention import Policy, Sweep, remove_chunk, removable_counts, retention_totals
from models.schema import AuditEvent, Notification, ResetBatch, WebhookDelivery, WebhookEvent
from models.seed import seed
from models.settings import get_settings
from producer import resets, webhooks
from producer.metrics import read_snapshot, snapshot_metrics
from tasks.notifications import outbox
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.start import start_job
from tests.db_backends import pipeline_db  # noqa: F401 - the fixture
from tests.reset_checks import fingerprint, run_job_in_process
from tests.test_cli_foundation import invoke, run_cli

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
EVERYTHING = ["reset.confirmed", "reset.succeeded", "reset.failed", "reset.cancelled"]


@dataclass
class History:
    org: object
    finished: str  # succeeded course-wide job: sent and failed notifications, one still pending
    running: str  # a course-wide job still running, with a done batch and sent notifications
    pending_id: int  # the finished job's notification still to be sent


def confirmed(session, org, course):
    req = resets.request(session, org.admin_id, course, reason="procedure changed")
    return resets.confirm(session, req.request_id, org.admin_id, req.token).job_id


def send_all(session, job_id, at: datetime, fail: int = 1, keep_pending: int = 0) -> list[int]:
    """Claim the job's notifications; the first ``keep_pending`` go back unsent, ``fail`` fail, the rest
    are sent. Returns the ids left pending."""
    claims = outbox.claim_notifications(session, job_id, 10_000, lease_seconds=30.0, max_attempts=5)
    kept, failed, sent = claims[:keep_pending], claims[keep_pending:keep_pending + fail], claims[keep_pending + fail:]
    outbox.release_notifications(session, kept, at)
    for claim in failed:
        outbox.mark_failed(session, claim, "mailbox unavailable")
    outbox.mark_sent_many(session, [(c.id, f"p-{c.id}") for c in sent])
    return [c.id for c in kept]


def deliver_everything(session, at: datetime) -> None:
    d = WebhookDelivery.__table__.c
    session.execute(update(WebhookDelivery).where(d.status == "pending").values(status="delivered", delivered_at=at))


def make_history(session, loopback_hook: bool = True, at: datetime = T0) -> History:
    """At ``at``: one finished course-wide job and one still running, with their outbox rows settled."""
    org = seed(session, learners=40, lessons=3, courses=2, completed_ratio=0.5, random_seed=11)
    with freeze_time(at):
        if loopback_hook:
            webhooks.create_endpoint(session, org.organization_id, "https://93.184.216.34/hooks", EVERYTHING)
        finished = confirmed(session, org, org.course_ids[0])
        assert run_job_in_process(session, finished, batch_size=10).state == "succeeded"
        pending = send_all(session, finished, at, fail=2, keep_pending=1)
        running = confirmed(session, org, org.course_ids[1])
        start = start_job(session, running, 10, purge_partitions=1)
        assert len(start.batch_nos) > 1
        claim_batch(session, running, start.batch_nos[0], 5, 60)
        reset_batch(session, running, start.batch_nos[0])
        send_all(session, running, at, fail=0)
        deliver_everything(session, at)
        session.flush()
    return History(org, finished, running, pending[0])


def sweep_until_done(session, at: datetime, chunk_rows: int = 7) -> Sweep:
    sweep = Sweep(Policy.at(at, get_settings()), chunk_rows)
    while remove_chunk(session, sweep):
        pass
    return sweep


def rows_of(session, table, column, job_id) -> int:
    return session.scalar(select(func.count()).select_from(table).where(column == uuid.UUID(job_id)))


def audit_trail(session) -> list[tuple]:
    a = AuditEvent.__table__.c
    return session.execute(select(a.id, a.action, a.job_id, a.learner_count, a.created_at).order_by(a.id)).all()


def test_rows_go_after_their_window_and_status_and_audit_stay_true(pipeline_db):
    session = pipeline_db
    h = make_history(session)
    n, b = Notification.__table__.c, ResetBatch.__table__.c
    status_before = describe_status(session, get_job(session, h.finished))
    running_before = describe_status(session, get_job(session, h.running))
    audit_before = audit_trail(session)
    assert status_before["notifications"]["sent"] > 0 and status_before["notifications"]["failed"] == 2
    assert status_before["notifications"]["pending"] == 1
    counters_before = {m.name: m.samples[0].value for m in snapshot_metrics(read_snapshot(session, T0))
                       if m.type == "counter"}

    # A day short of every window: nothing goes.
    early = sweep_until_done(session, T0 + timedelta(days=29))
    assert early.report() == dict.fromkeys(early.report(), 0)

    later = T0 + timedelta(days=31)
    expected = removable_counts(session, Policy.at(later, get_settings()))
    finished_rows = rows_of(session, Notification, n.reset_job_id, h.finished)
    running_rows = rows_of(session, Notification, n.reset_job_id, h.running)
    assert expected["notifications"] == finished_rows - 1  # all but the pending one
    sweep = sweep_until_done(session, later)
    assert sweep.report() == expected
    assert sweep.chunks > 4  # chunks of 7 rows

    # The finished job: only its pending notification and its job row are left.
    assert session.scalars(select(n.id).where(n.reset_job_id == uuid.UUID(h.finished))).all() == [h.pending_id]
    assert rows_of(session, ResetBatch, b.job_id, h.finished) == 0
    # Nothing of the running job went: every notification, batch and delivery of it is there.
    assert rows_of(session, Notification, n.reset_job_id, h.running) == running_rows > 0
    assert describe_status(session, get_job(session, h.running)) == running_before
    assert rows_of(session, ResetBatch, b.job_id, h.running) == running_before["batches_total"]
    d = WebhookDelivery.__table__.c
    assert rows_of(session, WebhookDelivery, d.job_id, h.running) == 1  # its reset.confirmed
    assert rows_of(session, WebhookDelivery, d.job_id, h.finished) == 0
    assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 1
    # Status and audit trail read as before, and no counter went down.
    assert describe_status(session, get_job(session, h.finished)) == status_before
    assert audit_trail(session) == audit_before
    counters_after = {m.name: m.samples[0].value for m in snapshot_metrics(read_snapshot(session, later))
                      if m.type == "counter"}
    assert counters_after == counters_before
    totals = retention_totals(session)
    assert totals["notifications_sent"] == status_before["notifications"]["sent"]
    assert totals["notifications_failed"] == 2 and totals["batches_done"] == status_before["batches_done"]

    # Run again: nothing more goes.
    assert sweep_until_done(session, later).report() == dict.fromkeys(sweep.report(), 0)


def test_a_job_goes_after_its_window_once_nothing_of_it_is_left_to_send(pipeline_db):
    session = pipeline_db
    h = make_history(session)
    a_year_on = T0 + timedelta(days=366)
    sweep_until_done(session, a_year_on)
    get_job(session, h.finished)  # its notification is still to be sent: the job stays
    assert removable_counts(session, Policy.at(a_year_on, get_settings()))["reset_jobs"] == 0
    audit_before = audit_trail(session)

    n = Notification.__table__.c
    session.execute(update(Notification).where(n.id == h.pending_id).values(status="sent", sent_at=a_year_on))
    assert removable_counts(session, Policy.at(a_year_on, get_settings()))["reset_jobs"] == 1
    sweep = sweep_until_done(session, a_year_on)
    assert sweep.report()["reset_jobs"] == 1 and sweep.report()["notifications"] == 1
    with pytest.raises(NotFound):
        get_job(session, h.finished)
    assert rows_of(session, Notification, n.reset_job_id, h.finished) == 0
    # The audit trail keeps the fact of the reset (R5), and the running job is untouched.
    assert audit_trail(session) == audit_before
    assert any(row.job_id == uuid.UUID(h.finished) and row.action == "reset.succeeded" for row in audit_before)
    assert get_job(session, h.running).state == "running"
    assert rows_of(session, ResetBatch, ResetBatch.__table__.c.job_id, h.running) > 0
    assert retention_totals(session)["learners_reset"] > 0


def test_a_dead_batch_stays_with_its_job(pipeline_db):
    session = pipeline_db
    h = make_history(session, loopback_hook=False)
    b = ResetBatch.__table__.c
    first = session.scalar(select(func.min(b.batch_no)).where(b.job_id == uuid.UUID(h.finished)))
    session.execute(update(ResetBatch).where(b.job_id == uuid.UUID(h.finished), b.batch_no == first)
                    .values(state="dead", error="lock timeout"))
    sweep_until_done(session, T0 + timedelta(days=31))
    assert session.scalars(select(b.state).where(b.job_id == uuid.UUID(h.finished))).all() == ["dead"]
    # ... until the job itself goes: then with it.
    n = Notification.__table__.c
    session.execute(update(Notification).where(n.id == h.pending_id).values(status="sent"))
    gone = sweep_until_done(session, T0 + timedelta(days=366))
    assert gone.report()["reset_jobs"] == 1 and gone.report()["reset_batches"] == 1
    assert rows_of(session, ResetBatch, b.job_id, h.finished) == 0
    assert retention_totals(session)["batches_dead"] == 1


def test_the_cli_counts_what_the_apply_removes_and_the_dry_run_changes_nothing(fresh_db, use_env):
    from models.db import session_scope

    use_env(DATABASE_URL=fresh_db())
    with session_scope() as session:
        h = make_history(session)
    with freeze_time(T0 + timedelta(days=31)):
        with session_scope() as session:
            before = fingerprint(session)
        dry = invoke("retention", "--json")
        assert dry.returncode == 0, dry.stderr
        with session_scope() as session:
            assert fingerprint(session) == before
        applied = invoke("retention", "--apply", "--json")
        assert applied.returncode == 0, applied.stderr
        text = invoke("retention")
    planned, done = json.loads(dry.stdout), json.loads(applied.stdout)
    assert not planned["applied"] and done["applied"]
    assert {t: v["rows"] for t, v in planned["tables"].items()} == {t: v["rows"] for t, v in done["tables"].items()}
    assert done["tables"]["notifications"]["rows"] > 0 and done["tables"]["webhook_events"]["rows"] == 2
    assert done["tables"]["notifications"]["days"] == 30 and done["never_removed"] == ["audit_events"]
    assert "audit_events" in text.stdout and "would remove" in text.stdout
    with session_scope() as session:
        assert describe_status(session, get_job(session, h.finished))["notifications"]["failed"] == 2


@pytest.mark.parametrize("variable, value, message", [
    ("RETENTION_NOTIFICATIONS_DAYS", "-1", "RETENTION_NOTIFICATIONS_DAYS must be at least 1, got -1"),
    ("RETENTION_CHUNK_ROWS", "lots", "RETENTION_CHUNK_ROWS must be a whole number, got 'lots'"),
    ("RETENTION_JOBS_DAYS", "0", "RETENTION_JOBS_DAYS must be at least 1, got 0"),
])
def test_a_bad_setting_is_refused_in_one_line_and_nothing_is_removed(fresh_db, use_env, variable, value, message):
    """Through the installed command (the history is a year old: without the bad value, rows would go)."""
    from models.db import session_scope

    env = use_env(DATABASE_URL=fresh_db())
    with session_scope() as session:
        make_history(session, loopback_hook=False, at=datetime.now(timezone.utc) - timedelta(days=400))
    with session_scope() as session:
        before = fingerprint(session)
    ran = run_cli("retention", "--apply", env={**env, variable: value})
    assert ran.returncode == 1
    assert ran.stderr == f"error: configuration: {message}\n"
    with session_scope() as session:
        assert fingerprint(session) == before
    assert run_cli("retention", "--json", env=env).stdout.count('"rows": 0') < 5


def test_the_task_runs_on_its_own_beat_entry_and_removes_in_slices(fresh_db, use_env):
    from models.db import session_scope
    from tasks import retention as task
    from workers.config import celery_config

    config = celery_config(get_settings())
    assert config["task_routes"][task.TASK_NAME] == {"queue": "maintenance"}
    assert any(e["task"] == task.TASK_NAME for e in config["beat_schedule"].values())
    use_env(DATABASE_URL=fresh_db(), RETENTION_CHUNK_ROWS="5")
    with session_scope() as session:
        make_history(session)
    with freeze_time(T0 + timedelta(days=31)):
        nothing = task.remove_for_a_slice(budget_seconds=0)
        assert nothing["more"] and not any(v for k, v in nothing.items() if k != "more")
        report = task.remove_for_a_slice(budget_seconds=60)
        assert not report["more"] and report["notifications"] > 5
        again = task.remove_for_a_slice(budget_seconds=60)
    assert not any(v for k, v in again.items() if k != "more")


def test_a_job_window_shorter_than_its_rows_waits_for_them_and_the_dry_run_counts_what_goes(pipeline_db):
    session = pipeline_db
    h = make_history(session, loopback_hook=False)
    n, b = Notification.__table__.c, ResetBatch.__table__.c
    session.execute(update(Notification).where(n.id == h.pending_id).values(status="sent", sent_at=T0))
    days = {"notifications": 30, "webhook_deliveries": 30, "webhook_events": 30, "reset_batches": 30,
            "reset_jobs": 1}
    # Two days on, the job is past its own window but its rows are not: nothing of it goes.
    early = removable_counts(session, Policy(T0 + timedelta(days=2), days))
    assert early == dict.fromkeys(early, 0)
    # A month on, its rows go and the job with them, in the same pass.
    later = Policy(T0 + timedelta(days=31), days)
    expected = removable_counts(session, later)
    assert expected["reset_jobs"] == 1
    assert expected["notifications"] == rows_of(session, Notification, n.reset_job_id, h.finished)
    assert expected["reset_batches"] == rows_of(session, ResetBatch, b.job_id, h.finished) > 0
    sweep = Sweep(later, 5)
    while remove_chunk(session, sweep):
        pass
    assert sweep.report() == expected
    with pytest.raises(NotFound):
        get_job(session, h.finished)
    assert get_job(session, h.running).state == "running"


@pytest.mark.e2e
def test_a_worker_on_the_maintenance_queue_runs_the_task_by_name(fresh_db, use_env, redis_url, celery_worker_proc):
    """Task wiring: ``maintenance.retention`` published by name is run by a real worker."""
    import time

    from models.db import dispose_engine, session_scope
    from models.messaging import send_now

    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, LOG_FORMAT="json")
    with session_scope() as session:
        h = make_history(session, at=datetime.now(timezone.utc) - timedelta(days=40))
        running_rows = rows_of(session, Notification, Notification.__table__.c.reset_job_id, h.running)
    celery_worker_proc(env, queues="maintenance", concurrency=1, name="retention")
    assert send_now("maintenance.retention")
    n = Notification.__table__.c
    deadline = time.monotonic() + 60
    while True:
        with session_scope() as session:
            left = session.scalars(select(n.id).where(n.reset_job_id == uuid.UUID(h.finished))).all()
        if left == [h.pending_id]:
            break
        assert time.monotonic() < deadline, f"retention did not run: {len(left)} rows left"
        time.sleep(0.2)
    with session_scope() as session:
        assert rows_of(session, Notification, n.reset_job_id, h.running) == running_rows
        assert describe_status(session, get_job(session, h.finished))["notifications"]["failed"] == 2
    dispose_engine()
