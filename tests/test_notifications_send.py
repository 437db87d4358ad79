"""Notifications, tier (b): dispatches and the courier in-process, with real commits (PostgreSQL
or the embedded SQLite, a Redis broker, real SMTP / HTTP servers on loopback), duplicates replayed
and a crash between send and mark simulated.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select

from models.db import dispose_engine, session_scope
from models.migrate import upgrade
from models.schema import Notification, User
from models.seed import seed
from models.settings import get_settings
from models.states import NotificationStatus
from models.times import utcnow
from tasks.notifications import dispatching, outbox, sending
from tasks.notifications import tasks as notification_tasks
from tasks.notifications.backends import SmtpBackend
from tasks.notifications.message import render_notifications
from tasks.outbound.courier import courier_for
from tasks.ratelimit import FileRateLimiter, notification_rate_limiter
from tests.notify_support import SmtpSink, WebhookSink, insert_outbox

FAST = {"NOTIFY_RATE_PER_SECOND": "100000", "NOTIFY_CHUNK_SIZE": "20"}


@pytest.fixture
def committed(fresh_db, use_env, redis_url):
    """Factory: ``committed(**env)`` -> (org, job id, notified user ids) in a fresh PostgreSQL
    database with one job's outbox rows committed, the environment applied."""
    redis.Redis.from_url(redis_url).flushdb()

    def make(learners: int = 80, **env):
        use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url, **{**FAST, **env})
        with session_scope() as session:
            org = seed(session, learners=learners, lessons=2, random_seed=learners)
            job_id, users = insert_outbox(session, org.course_ids[0])
        return org, job_id, users

    yield make
    courier_for(get_settings()).wait_idle(30)
    dispose_engine()


def rows_of(job_id) -> dict[int, Notification]:
    with session_scope() as session:
        return {r.user_id: r for r in session.scalars(select(Notification).where(Notification.reset_job_id == job_id))}


def email_of(user_id: int) -> str:
    with session_scope() as session:
        return session.get(User, user_id).email


def queued_sends(redis_url: str) -> list[dict]:
    """Headers of the ``notifications.send`` messages waiting in the broker's ``notifications`` queue."""
    client = redis.Redis.from_url(redis_url)
    return [json.loads(raw)["headers"] for raw in client.lrange("notifications", 0, -1)]


def dispatch_and_send(job_id, reserved: int = 0, slot_at: float | None = None) -> dispatching.DispatchResult:
    """One dispatch, as the task runs it, and the courier's work it started, to the end."""
    result = dispatching.dispatch_notifications(str(job_id) if job_id else None, reserved, slot_at)
    assert courier_for(get_settings()).wait_idle(30)
    return result


def run_until_settled(job_id, timeout: float = 30.0) -> None:
    """Follow the job's chain as its messages would: each dispatch, then the one it scheduled."""
    deadline = time.monotonic() + timeout
    reserved, slot_at = 0, None
    while any(r.status in (NotificationStatus.PENDING, NotificationStatus.SENDING) for r in rows_of(job_id).values()):
        assert time.monotonic() < deadline, "notifications did not settle"
        result = dispatch_and_send(job_id, reserved, slot_at)
        reserved, slot_at = result.reserved, (time.time() + result.next_in if result.reserved else None)
        time.sleep(min(result.next_in or 0.05, 2.0))


def test_a_dispatch_hands_a_group_to_the_courier_which_sends_each_row_once(committed, redis_url):
    with WebhookSink() as sink:
        _org, job_id, users = committed(**sink.env())
        first = dispatch_and_send(job_id)
        assert (first.outcome, first.claimed) == ("handed", int(FAST["NOTIFY_CHUNK_SIZE"]))
        assert first.next_in == 0  # the job's next group, published at once
        assert [h["task"] for h in queued_sends(redis_url)] == ["notifications.send"]
        run_until_settled(job_id)
    assert sink.keys_per_learner() == {u: 1 for u in users}
    assert len(sink.deliveries()) == len(users)
    assert all(r.status == NotificationStatus.SENT and r.provider_id == f"wh-notification-{r.id}.{job_id}"
               and r.attempts == 1 and r.sent_at is not None for r in rows_of(job_id).values())


def test_slots_in_the_future_are_reserved_and_carried_by_the_next_message_instead_of_waited_for(committed, redis_url):
    with WebhookSink() as sink:
        # 2/s: a group is one notification, and the next slot is half a second away.
        _org, job_id, users = committed(learners=12, NOTIFY_RATE_PER_SECOND="2", **sink.env())
        handed = dispatch_and_send(job_id)
        started = time.monotonic()
        second = dispatching.dispatch_notifications(str(job_id))
        assert time.monotonic() - started < 0.2, "a dispatch never waits for its slots"
        assert (handed.claimed, second.outcome, second.reserved) == (1, "reserved", 1)
        assert 0 < second.next_in <= 0.55
        (carrying,) = [h for h in queued_sends(redis_url) if h["eta"]]
        job_arg, slots, slot_at = json.loads(carrying["argsrepr"].replace("'", '"'))
        assert (job_arg, slots) == (str(job_id), 1) and abs(slot_at - (time.time() + second.next_in)) < 0.3
        # Another message for the job (a batch's, or a redelivery) stands aside: the chain goes on.
        assert dispatching.dispatch_notifications(str(job_id)).outcome == "waiting"
        time.sleep(second.next_in)
        assert dispatch_and_send(job_id, second.reserved, slot_at).claimed == 1
        # Slots missed by more than a group's time are not used late (they would bunch up): the
        # late message reserves anew.
        late = dispatching.dispatch_notifications(str(job_id), 1, time.time() - 1.0)
        assert (late.outcome, late.claimed) in (("reserved", 0), ("handed", 1))
        run_until_settled(job_id)
    assert sink.keys_per_learner() == {u: 1 for u in users}


def test_duplicate_dispatches_at_the_same_time_send_each_row_once(committed):
    with WebhookSink() as sink:
        _org, job_id, users = committed(learners=150, **sink.env())
        # Three copies of the job's message, two carrying slots, and two "any job" ones, all at once.
        args = [(str(job_id), 0)] * 3 + [(str(job_id), 20)] * 2 + [(None, 0)] * 2
        for _ in range(4):
            threads = [threading.Thread(target=dispatching.dispatch_notifications, args=a) for a in args]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert courier_for(get_settings()).wait_idle(30)
        run_until_settled(job_id)
    assert sink.keys_per_learner() == {u: 1 for u in users}
    assert len(sink.deliveries()) == len(users)  # not even a duplicate for the receiver to drop
    assert {r.status for r in rows_of(job_id).values()} == {NotificationStatus.SENT}


def test_task_entry_point_round_trips_its_arguments_through_json(committed):
    with WebhookSink() as sink:
        _org, job_id, users = committed(**sink.env())
        (arg,) = json.loads(json.dumps([str(job_id)]))
        notification_tasks.send_notifications(arg)  # the task body, in-process
        notification_tasks.send_notifications("not-a-job-id")  # refused with a log line, nothing claimed
        assert courier_for(get_settings()).wait_idle(30)
    assert len(sink.accepted()) == int(FAST["NOTIFY_CHUNK_SIZE"])


def test_provider_outage_holds_the_rows_then_they_catch_up(committed):
    with WebhookSink() as sink:
        _org, job_id, users = committed(**sink.env())
        sink.state.fail_status, sink.state.retry_after = 503, "1"
        down = dispatch_and_send(job_id)
        # One request hit the dead provider; the rest of the group went back untried and every
        # due row of the job waits for the retry instead of spinning through the provider.
        assert down.claimed == int(FAST["NOTIFY_CHUNK_SIZE"]) and len(sink.deliveries()) == 1
        rows = rows_of(job_id)
        tried = [r for r in rows.values() if r.attempts == 1]
        assert len(tried) == 1 and tried[0].error.startswith("HTTP 503")
        assert all(r.status == NotificationStatus.PENDING and r.next_attempt_at is not None for r in rows.values())
        idle = dispatch_and_send(job_id)
        assert (idle.outcome, idle.claimed) == ("idle", 0)  # nothing is due yet ...
        assert 0.5 <= idle.next_in <= 1.1  # ... and the chain wakes when the retry is due
        sink.state.fail_status = None
        time.sleep(idle.next_in)
        run_until_settled(job_id)
    assert sink.keys_per_learner() == {u: 1 for u in users}
    assert {r.status for r in rows_of(job_id).values()} == {NotificationStatus.SENT}


def test_a_dispatch_whose_reserved_rows_were_put_off_meanwhile_keeps_the_chain_going(committed, redis_url):
    with WebhookSink() as sink:
        _org, job_id, users = committed(**sink.env())
        sink.state.fail_status, sink.state.retry_after = 503, "1"
        dispatch_and_send(job_id)  # the provider is down: every due row of the job waits a second
        redis.Redis.from_url(redis_url).flushdb()
        # The chain's next message had reserved slots for a group before the outage put the rows off.
        arrived = dispatch_and_send(job_id, int(FAST["NOTIFY_CHUNK_SIZE"]), time.time())
        assert (arrived.outcome, arrived.claimed) == ("idle", 0)
        assert arrived.next_in is not None and 0.5 <= arrived.next_in <= 1.1, arrived  # not the chain's end
        assert [h["task"] for h in queued_sends(redis_url)] == ["notifications.send"]
        sink.state.fail_status = None
        time.sleep(arrived.next_in)
        run_until_settled(job_id)
    assert sink.keys_per_learner() == {u: 1 for u in users}


def test_a_refused_address_fails_with_its_reason_and_is_not_retried(committed):
    with WebhookSink() as sink:
        _org, job_id, users = committed(**sink.env())
        bad = min(users)
        sink.state.reject_emails.add(email_of(bad))
        run_until_settled(job_id)
    row = rows_of(job_id)[bad]
    assert row.status == NotificationStatus.FAILED and row.attempts == 1
    assert row.error == "HTTP 422: {\"error\": \"recipient address is invalid\"}"
    assert bad not in sink.keys_per_learner() and len(sink.accepted()) == len(users) - 1


def test_transient_failures_give_up_after_max_attempts(committed):
    with WebhookSink() as sink:
        _org, job_id, users = committed(NOTIFY_MAX_ATTEMPTS="2", **sink.env())
        sink.state.fail_status = 500
        dispatch_and_send(job_id)
        wait = (min(r.next_attempt_at for r in rows_of(job_id).values()) - utcnow()).total_seconds()
        time.sleep(max(0.0, wait) + 0.05)
        dispatch_and_send(job_id)
    failed = [r for r in rows_of(job_id).values() if r.status == NotificationStatus.FAILED]
    assert len(failed) == 1 and failed[0].attempts == 2
    assert failed[0].error.startswith("gave up after 2 attempts; last error: HTTP 500")
    assert all(r.attempts == 0 for r in rows_of(job_id).values() if r.status == NotificationStatus.PENDING)


def test_crash_between_send_and_mark_resends_with_the_same_message_id_once_the_lease_ended(committed):
    """The provider accepted a message, then the worker died before marking the row: the row is
    held for its claim's lease, then claimed again, and the resend carries the same Message-ID."""
    with SmtpSink() as sink:
        _org, job_id, users = committed(SMTP_TIMEOUT_SECONDS="2", **sink.env())
        settings = get_settings()
        lease = sending.claim_lease_seconds(settings)
        assert lease == 2 + sending.LEASE_MARGIN_SECONDS
        with session_scope() as session:
            claims = outbox.claim_notifications(session, str(job_id), 3, lease, settings.notify_max_attempts)
            ready, _ = render_notifications(session, claims, settings)
        backend = SmtpBackend(settings)
        backend.send(ready[0][1])  # ... and the worker dies here, before mark_sent
        backend._drop()
        run_until_settled(job_id, timeout=60)  # the three lost rows come back when their lease ends
    crashed = ready[0][0]
    per_rcpt = sink.by_recipient()
    resent = per_rcpt[ready[0][1].recipient_email]
    assert len(resent) == 2 and resent[0].message_id == resent[1].message_id == \
        f"<notification-{crashed.id}.{job_id}@progress-reset>"
    assert len(per_rcpt) == len(users) and all(len(v) == 1 for k, v in per_rcpt.items()
                                               if k != ready[0][1].recipient_email)
    rows = rows_of(job_id)
    assert {r.status for r in rows.values()} == {NotificationStatus.SENT} and rows[crashed.user_id].attempts == 2
    assert resent[1].at - resent[0].at >= lease - 0.5, "never taken over while its lease ran"


def test_embedded_default_sqlite_and_console_file(tmp_path, use_env):
    """With nothing but a SQLite file: the same functions (conditional claim without SKIP
    LOCKED), a file-locked rate limiter, one JSON line per notification."""
    out = tmp_path / "notifications.jsonl"
    use_env(DATABASE_URL=f"sqlite:///{tmp_path / 'embedded.db'}", CELERY_BROKER_URL=None, REDIS_URL=None,
            NOTIFY_BACKEND="console", NOTIFY_CONSOLE_PATH=str(out), NOTIFY_RATE_PER_SECOND="100000",
            NOTIFY_CHUNK_SIZE="10", PROGRESS_RESET_DATA_DIR=str(tmp_path / "data"))
    try:
        upgrade()
        with session_scope() as session:
            org = seed(session, learners=60, lessons=2, random_seed=2)
            job_id, users = insert_outbox(session, org.course_ids[0])
        assert isinstance(notification_rate_limiter(get_settings()), FileRateLimiter)
        for _ in range(3):
            threads = [threading.Thread(target=dispatching.dispatch_notifications, args=(a,))
                       for a in (str(job_id),) * 2 + (None,)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert courier_for(get_settings()).wait_idle(30)
        run_until_settled(job_id)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(d["learner"]["id"] for d in lines) == sorted(users)
        assert {r.status for r in rows_of(job_id).values()} == {NotificationStatus.SENT}
        with session_scope() as session:  # the sweep's queries run on SQLite too
            assert outbox.sweep_notifications(session, 6.0, utcnow() + timedelta(hours=1)) == 0
    finally:
        dispose_engine()
