"""Notifications, tier (a): the plain functions against real PostgreSQL, the backends
against real servers on loopback, and the rate limiters against real Redis / files.
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.db import make_engine
from models.messaging import pending_publishes
from models.schema import Course, Notification, User
from models.seed import seed
from models.settings import Settings
from models.states import NotificationStatus
from models.times import utcnow
from tasks.notifications import dispatching, outbox
from tasks.notifications.backends import (
    BackendConfigError,
    ConsoleBackend,
    PermanentSendError,
    SmtpBackend,
    TransientSendError,
    WebhookBackend,
    make_backend,
)
from tasks.notifications.message import OutgoingMessage, render_notifications
from tasks.outbound.answers import parse_retry_after, redact
from tasks.ratelimit import FileRateLimiter, ProcessRateLimiter, RedisRateLimiter
from tests.notify_support import SmtpSink, WebhookSink, free_port, insert_outbox, measured_rate
from workers import app as _app  # noqa: F401 - the Celery app the sweep's publish_after_commit needs


def settings_for(**changes) -> Settings:
    return Settings.from_env({}).with_overrides(**changes)


LEASE = 15.0  # seconds a claim owns its rows in these tests


def claim_rows(session, job_id, limit, now=None, max_attempts=8, token=None):
    return outbox.claim_notifications(session, job_id, limit, LEASE, max_attempts, now, token)


@pytest.fixture
def pending_rows(db_session):
    org = seed(db_session, learners=60, lessons=2, courses=1, completed_ratio=0.4, random_seed=11)
    job_id, users = insert_outbox(db_session, org.course_ids[0])
    db_session.flush()
    return org, job_id, users


def rows(session, job_id):
    return {r.user_id: r for r in session.scalars(select(Notification).where(Notification.reset_job_id == job_id)
                                                  .execution_options(populate_existing=True))}


# --- claiming ---------------------------------------------------------------------------------

def test_claim_takes_due_rows_in_chunks_and_counts_the_attempt(db_session, pending_rows):
    _org, job_id, users = pending_rows
    first = claim_rows(db_session, job_id, limit=10)
    second = claim_rows(db_session, job_id, limit=10)
    assert len(first) == len(second) == 10
    assert not {c.id for c in first} & {c.id for c in second}
    assert all(c.attempts == 1 and c.reset_job_id == job_id for c in first + second)
    state = rows(db_session, job_id)
    claimed = [r for r in state.values() if r.status == NotificationStatus.SENDING]
    assert len(claimed) == 20 and all(r.claimed_at is not None for r in claimed)
    rest = claim_rows(db_session, job_id, limit=10_000)
    assert len(rest) == len(users) - 20
    assert claim_rows(db_session, job_id, limit=10) == []


def test_claim_skips_rows_not_yet_due_and_other_jobs(db_session, pending_rows):
    org, job_id, _users = pending_rows
    other_job, _ = insert_outbox(db_session, org.course_ids[0])
    now = utcnow()
    db_session.execute(update(Notification).where(Notification.reset_job_id == job_id)
                       .values(next_attempt_at=now + timedelta(minutes=5)))
    assert claim_rows(db_session, job_id, limit=100, now=now) == []
    # With no job given, any job's due rows are claimed: only the other job's are due.
    claimed = claim_rows(db_session, None, limit=10_000, now=now)
    assert claimed and {c.reset_job_id for c in claimed} == {other_job}
    later = claim_rows(db_session, job_id, limit=10_000, now=now + timedelta(minutes=6))
    assert len(later) == len(rows(db_session, job_id))


def test_concurrent_claims_never_overlap(fresh_db):
    """Two transactions claiming at the same time on PostgreSQL get disjoint rows (SKIP LOCKED)."""
    engine = make_engine(fresh_db())
    try:
        with Session(engine) as session, session.begin():
            org = seed(session, learners=80, lessons=2, random_seed=5)
            job_id, users = insert_outbox(session, org.course_ids[0])
        both_claimed = threading.Barrier(2, timeout=10)
        results: list[list[int]] = []

        def claimer():
            with Session(engine) as session, session.begin():
                claimed = claim_rows(session, job_id, limit=15)
                both_claimed.wait()  # both transactions are open, holding their row locks
                results.append([c.id for c in claimed])

        threads = [threading.Thread(target=claimer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert len(results) == 2 and all(len(r) == 15 for r in results)
        assert not set(results[0]) & set(results[1])
    finally:
        engine.dispose()


# --- rendering and outcomes ---------------------------------------------------------------------

def test_render_names_learner_and_course_and_links_to_it(db_session, pending_rows):
    org, job_id, _users = pending_rows
    settings = settings_for(course_base_url="https://learn.example.org/courses")
    claims = claim_rows(db_session, job_id, limit=3)
    ready, broken = render_notifications(db_session, claims, settings)
    assert not broken and len(ready) == 3
    course = db_session.get(Course, org.course_ids[0])
    for claim, message in ready:
        user = db_session.get(User, claim.user_id)
        assert message.recipient_email == user.email and message.recipient_name == user.name
        assert user.name in message.text and course.title in message.text and course.title in message.subject
        assert message.course_url == f"https://learn.example.org/courses/{course.id}"
        assert message.course_url in message.text
        assert message.message_id == f"<notification-{claim.id}.{job_id}@progress-reset>"
        assert message.idempotency_key == f"notification-{claim.id}.{job_id}"


def test_render_fails_rows_whose_learner_is_gone(db_session, pending_rows):
    _org, job_id, _users = pending_rows
    ghost = Notification(user_id=10**8, course_id=1, reset_job_id=job_id, kind="course_assigned")
    db_session.add(ghost)
    db_session.flush()
    claims = [c for c in claim_rows(db_session, job_id, limit=10_000) if c.id == ghost.id]
    ready, broken = render_notifications(db_session, claims, settings_for())
    assert ready == [] and broken[0][1] == f"learner {10**8} no longer exists"


def test_outcomes_sent_retry_failed_and_release(db_session, pending_rows):
    _org, job_id, _users = pending_rows
    settings = settings_for(notify_max_attempts=2)
    a, b, c, d = claim_rows(db_session, job_id, limit=4)
    now = utcnow()

    assert outbox.mark_sent(db_session, a.id, "wh-123", now)
    assert not outbox.mark_sent(db_session, a.id, "again", now)  # already sent: left as it is

    next_at = outbox.mark_retry(db_session, b, "HTTP 503: busy", settings, now, retry_after=30)
    assert next_at is not None and next_at >= now + timedelta(seconds=30)
    # Permanent failure: reason kept, addresses removed.
    assert outbox.mark_failed(db_session, c, "SMTP 550 on RCPT TO: <bob@example.com>: User unknown", now)
    assert outbox.release_notifications(db_session, [d], now) == 1

    state = {r.id: r for r in rows(db_session, job_id).values()}
    assert (state[a.id].status, state[a.id].provider_id) == (NotificationStatus.SENT, "wh-123")
    assert (state[b.id].status, state[b.id].attempts, state[b.id].error) == \
        (NotificationStatus.PENDING, 1, "HTTP 503: busy")
    assert state[c.id].status == NotificationStatus.FAILED
    assert state[c.id].error == "SMTP 550 on RCPT TO: <<address>>: User unknown"
    assert (state[d.id].status, state[d.id].attempts) == (NotificationStatus.PENDING, 0)  # never tried: not counted

    # Second transient failure of b reaches notify_max_attempts=2: failed with the reason.
    (b2,) = [x for x in claim_rows(db_session, job_id, limit=100,
                                              now=now + timedelta(seconds=31)) if x.id == b.id]
    assert b2.attempts == 2
    assert outbox.mark_retry(db_session, b2, "HTTP 503: busy", settings, now) is None
    row = {r.id: r for r in rows(db_session, job_id).values()}[b.id]
    assert row.status == NotificationStatus.FAILED
    assert row.error == "gave up after 2 attempts; last error: HTTP 503: busy"


def test_outcomes_of_a_lost_claim_do_not_overwrite_the_new_owner(db_session, pending_rows):
    _org, job_id, _users = pending_rows
    t0 = utcnow()
    (old,) = claim_rows(db_session, job_id, limit=1, now=t0)
    # While the claim's lease runs, no one else takes the row.
    assert old.id not in {c.id for c in claim_rows(db_session, job_id, limit=1000, now=t0 + timedelta(seconds=LEASE - 1))}
    # Its lease ended (the worker was lost): another claim takes it, attempt 2, a token of its own.
    (new,) = claim_rows(db_session, job_id, limit=1, now=t0 + timedelta(seconds=LEASE + 1))
    assert new.id == old.id and new.attempts == 2 and new.token != old.token
    assert not outbox.mark_failed(db_session, old, "late failure")
    assert outbox.mark_retry(db_session, old, "late", settings_for()) is None
    assert outbox.release_notifications(db_session, [old], t0) == 0
    assert db_session.get(Notification, old.id, populate_existing=True).status == NotificationStatus.SENDING
    assert outbox.mark_failed(db_session, new, "the owner's failure")


def test_a_lost_claim_that_used_the_last_attempt_fails_instead_of_looping(db_session, pending_rows):
    _org, job_id, _users = pending_rows
    t0 = utcnow()
    (lost,) = claim_rows(db_session, job_id, limit=1, now=t0, max_attempts=1)
    claim_rows(db_session, job_id, limit=1000, now=t0 + timedelta(seconds=LEASE + 1), max_attempts=1)
    row = db_session.get(Notification, lost.id, populate_existing=True)
    assert (row.status, row.attempts) == (NotificationStatus.FAILED, 1) and "worker lost" in row.error


def test_retry_delay_grows_exponentially_with_jitter_and_honours_retry_after():
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(outbox.RETRY_MAX_SECONDS, outbox.RETRY_BASE_SECONDS * 2 ** (attempt - 1))
        delays = [outbox.retry_delay(attempt, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert outbox.retry_delay(1, retry_after=42.0, rng=rng) == 42.0
    # Follow-up countdowns stay far below the broker's visibility timeout.
    assert dispatching.max_countdown_seconds(settings_for(visibility_timeout_seconds=3600)) == 300
    assert dispatching.max_countdown_seconds(settings_for(visibility_timeout_seconds=600)) == 60


# --- the sweep --------------------------------------------------------------------------------

def test_sweep_publishes_one_send_per_job_left_behind_and_none_for_a_live_chain(db_session, pending_rows):
    org, job_id, users = pending_rows
    other_job, _ = insert_outbox(db_session, org.course_ids[0])
    settings = settings_for(publish_stale_seconds=30)
    t0 = utcnow()
    claims = claim_rows(db_session, job_id, limit=5, now=t0)
    # Fresh rows, live claims: nothing is left behind yet (the batch's own publish is on its way).
    assert outbox.sweep_notifications(db_session, LEASE, t0, settings) == 0
    assert not pending_publishes(db_session)

    later = t0 + timedelta(seconds=120)  # the claims' leases ended, the rest was never published
    waiting = outbox.sweep_notifications(db_session, LEASE, later, settings)
    assert waiting == len(users) + len(rows(db_session, other_job))
    assert sorted(pending_publishes(db_session)) == sorted(
        [("notifications.send", [str(job_id)], {}), ("notifications.send", [str(other_job)], {})])
    # Each job's chain is now due: a second sweep at once publishes nothing more.
    db_session.info.pop("progress_reset.on_commit", None)
    assert outbox.sweep_notifications(db_session, LEASE, later, settings) == 0
    # The rows of lost claims are claimable again, one more attempt each.
    again = {c.id: c for c in claim_rows(db_session, job_id, limit=10_000, now=later)}
    assert all(again[c.id].attempts == 2 for c in claims)


def test_sweep_restarts_a_chain_whose_dispatch_is_a_lease_late_even_for_fresh_rows(db_session, pending_rows):
    """A killed worker takes the chain's prefetched message along: once the job's dispatch is more
    than a claim's lease overdue, its due rows are left behind, however young they are."""
    _org, job_id, users = pending_rows
    settings = settings_for(publish_stale_seconds=60)
    t0 = utcnow()
    assert outbox.claim_wake(db_session, job_id, t0, t0)  # the chain's next dispatch, due at t0
    # Due less than a lease ago: the message may just be late; the chain is left to it.
    assert outbox.sweep_notifications(db_session, LEASE, t0 + timedelta(seconds=LEASE - 1), settings) == 0
    assert not pending_publishes(db_session)
    # A lease overdue, rows still younger than PUBLISH_STALE_SECONDS: the sweep starts the chain again.
    late = t0 + timedelta(seconds=LEASE + 1)
    assert outbox.sweep_notifications(db_session, LEASE, late, settings) == len(users)
    assert pending_publishes(db_session) == [("notifications.send", [str(job_id)], {})]
    assert outbox.wake_due_at(db_session, job_id) == late


# --- backends ---------------------------------------------------------------------------------

def outgoing(nid: int = 7, email: str = "ada@example.com", name: str = "Ada Lovelace") -> OutgoingMessage:
    job = "3f2b8c1e-0000-4000-8000-000000000001"
    return OutgoingMessage(
        notification_id=nid, reset_job_id=job, user_id=100 + nid, course_id=3, kind="course_assigned",
        recipient_name=name, recipient_email=email, course_title="Forklift safety Ü",
        course_url="https://t.example/courses/3", subject="Course assigned: Forklift safety Ü",
        text=f"Hello {name},\nForklift safety Ü\nhttps://t.example/courses/3\n")


def test_console_backend_appends_one_json_line_per_message(tmp_path):
    import json

    path = tmp_path / "out" / "notifications.jsonl"
    with ConsoleBackend(str(path)) as backend:
        assert backend.send(outgoing(1)) == "console:notification-1.3f2b8c1e-0000-4000-8000-000000000001"
        backend.send(outgoing(2))
    with ConsoleBackend(str(path)) as backend:  # appended, not truncated
        backend.send(outgoing(3))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["notification_id"] for d in lines] == [1, 2, 3]
    assert lines[0]["learner"]["name"] == "Ada Lovelace" and lines[0]["course"]["title"] == "Forklift safety Ü"


def test_smtp_backend_delivers_with_a_deterministic_message_id():
    with SmtpSink() as sink:
        backend = SmtpBackend(settings_for(**{"smtp_port": sink.port, "smtp_from": "training@example.com"}))
        try:
            assert backend.send(outgoing(1)) == "<notification-1.3f2b8c1e-0000-4000-8000-000000000001@progress-reset>"
            backend.send(outgoing(1))  # a resend (as after a crash) carries the same Message-ID
            backend.send(outgoing(2, "bob@example.com", "Bob"))
        finally:
            backend.close()
    first, resend, other = sink.deliveries
    assert first.message_id == resend.message_id != other.message_id
    assert first.rcpt == ["ada@example.com"] and "Ada Lovelace" in first.headers["To"]
    assert first.subject == "Course assigned: Forklift safety Ü"
    assert "Hello Ada Lovelace" in first.text and "https://t.example/courses/3" in first.text
    assert first.headers["X-Notification-Id"] == "1"


def test_smtp_backend_classifies_refusals():
    with SmtpSink() as sink:
        sink.refuse.add("nobody@example.com")
        backend = SmtpBackend(settings_for(smtp_port=sink.port))
        try:
            with pytest.raises(PermanentSendError) as permanent:
                backend.send(outgoing(1, "nobody@example.com"))
            assert permanent.value.code == "smtp_550" and "nobody@" not in permanent.value.reason
            assert not permanent.value.affects_all
            backend.send(outgoing(2))  # the connection is still good for the next recipient
            sink.tempfail = True
            with pytest.raises(TransientSendError) as transient:
                backend.send(outgoing(3))
            assert transient.value.code == "smtp_451" and not transient.value.affects_all
            with pytest.raises(PermanentSendError) as unencodable:
                backend.send(outgoing(5, "jürgen@example.com"))
            assert unencodable.value.code == "smtp_address"
        finally:
            backend.close()
    assert [d.rcpt for d in sink.deliveries] == [["ada@example.com"]]
    # Nothing listening: connection refused is transient and affects every message.
    refused = SmtpBackend(settings_for(smtp_port=free_port(), smtp_timeout_seconds=2))
    with pytest.raises(TransientSendError) as down:
        refused.send(outgoing(4))
    assert down.value.code == "connect_error" and down.value.affects_all


def test_smtp_backend_starttls_and_login(tmp_path, monkeypatch):
    import ssl

    from aiosmtpd.smtp import AuthResult

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    # The client trusts the test's own certificate authority the standard way.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    def authenticate(server, session, envelope, mechanism, auth_data):
        return AuthResult(success=(auth_data.login, auth_data.password) == (b"notifier", b"s3cret"))

    with SmtpSink(tls_context=context, require_starttls=True, authenticator=authenticate) as sink:
        good = SmtpBackend(settings_for(smtp_port=sink.port, smtp_starttls=True, smtp_username="notifier",
                                        smtp_password="s3cret"))
        try:
            good.send(outgoing(1))
        finally:
            good.close()
        plain = SmtpBackend(settings_for(smtp_port=sink.port, smtp_starttls=False))
        with pytest.raises(TransientSendError):  # the server insists on STARTTLS
            plain.send(outgoing(2))
        plain.close()
    assert len(sink.deliveries) == 1


def test_webhook_backend_signs_and_keys_each_message():
    with WebhookSink(secret="k3y") as sink:
        backend = WebhookBackend(settings_for(notify_webhook_url=sink.url, notify_webhook_secret="k3y"))
        try:
            first = backend.send(outgoing(1))
            again = backend.send(outgoing(1))
            backend.send(outgoing(2))
        finally:
            backend.close()
    deliveries = sink.deliveries()
    assert all(d.signature_ok for d in deliveries)
    assert first == again == "wh-notification-1.3f2b8c1e-0000-4000-8000-000000000001"
    assert [d.duplicate for d in deliveries] == [False, True, False]
    assert len(sink.accepted()) == 2
    payload = deliveries[0].payload
    assert payload["learner"] == {"id": 101, "name": "Ada Lovelace", "email": "ada@example.com"}
    assert payload["course"]["title"] == "Forklift safety Ü" and payload["course"]["url"].endswith("/courses/3")


def test_webhook_backend_classifies_failures():
    with WebhookSink(secret="k") as sink:
        backend = WebhookBackend(settings_for(notify_webhook_url=sink.url, notify_webhook_secret="k", notify_webhook_timeout_seconds=0.5))
        try:
            sink.state.fail_status, sink.state.retry_after = 503, "7"
            with pytest.raises(TransientSendError) as busy:
                backend.send(outgoing(1))
            assert (busy.value.code, busy.value.retry_after, busy.value.affects_all) == ("http_503", 7.0, True)
            sink.state.fail_status = 429
            with pytest.raises(TransientSendError):
                backend.send(outgoing(1))
            sink.state.fail_status = None
            sink.state.reject_emails.add("bad@example.com")
            with pytest.raises(PermanentSendError) as bad:
                backend.send(outgoing(2, "bad@example.com"))
            assert bad.value.code == "http_422" and "recipient address is invalid" in bad.value.reason
            sink.state.stall_seconds = 1.5
            with pytest.raises(TransientSendError) as slow:
                backend.send(outgoing(3))
            assert slow.value.code == "timeout"
        finally:
            sink.state.stall_seconds = 0
            backend.close()
    with pytest.raises(BackendConfigError):
        make_backend(settings_for(notify_backend="webhook", notify_webhook_url="", notify_webhook_secret="x"))


def test_retry_after_and_redaction():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("999999") == 3600.0
    assert redact("550 <a.b+c@x.example>: no such user") == "550 <<address>>: no such user"


# --- rate limiters ----------------------------------------------------------------------------

def _take(kind: str, target: str, rate: float, count: int, start_at: float, out) -> None:
    limiter = (RedisRateLimiter(target, "progress_reset:ratelimit:test", rate) if kind == "redis"
               else FileRateLimiter(target, rate))
    time.sleep(max(0.0, start_at - time.time()))
    stamps = []
    for _ in range(count):
        assert limiter.acquire(max_wait=30).granted
        stamps.append(time.time())
    out.put(stamps)


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_limiter_shares_one_rate_across_processes(kind, redis_url, tmp_path):
    """Three processes taking slots as fast as they can: together they get the configured rate."""
    target = redis_url if kind == "redis" else str(tmp_path / "bucket.tat")
    rate, per_process = 200.0, 100
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=_take, args=(kind, target, rate, per_process, start_at, out)) for _ in range(3)]
    for p in procs:
        p.start()
    stamps = [t for _ in procs for t in out.get(timeout=30)]
    for p in procs:
        p.join(10)
    assert len(stamps) == 300
    assert measured_rate(stamps) == pytest.approx(rate, rel=0.10)


def test_limiter_refuses_to_reserve_beyond_max_wait():
    limiter = ProcessRateLimiter(rate_per_second=1.0)
    assert limiter.reserve(max_wait=5).granted
    assert limiter.reserve(max_wait=5).granted  # the next slot, one second away
    later = limiter.reserve(max_wait=0.5)
    assert not later.granted and 1.5 <= later.wait <= 2.0


@pytest.mark.parametrize("kind", ["redis", "file", "process"])
def test_a_group_of_slots_goes_at_once_and_the_next_group_lines_up_behind_it(kind, redis_url, tmp_path):
    """At 10/s with a burst of 5: a group of 5 may go now, the next group of 5 in half a second
    (when all of its slots are due), and nothing more within that second."""
    import uuid as _uuid

    if kind == "redis":
        limiter = RedisRateLimiter(redis_url, f"test:group:{_uuid.uuid4()}", rate_per_second=10.0, burst=5)
    elif kind == "file":
        limiter = FileRateLimiter(tmp_path / "bucket.tat", rate_per_second=10.0, burst=5)
    else:
        limiter = ProcessRateLimiter(rate_per_second=10.0, burst=5)
    first = limiter.reserve(max_wait=1.0, count=5)
    assert first.granted and first.wait < 0.05, first
    second = limiter.reserve(max_wait=1.0, count=5)
    assert second.granted and 0.45 <= second.wait <= 0.55, second
    third = limiter.reserve(max_wait=0.1)
    assert not third.granted and 0.55 <= third.wait <= 0.65, third


def test_a_group_larger_than_the_burst_waits_for_its_last_slot():
    limiter = ProcessRateLimiter(rate_per_second=10.0)
    group = limiter.reserve(max_wait=1.0, count=3)
    assert group.granted and 0.19 <= group.wait <= 0.21, group


def test_redis_limiter_buckets_are_per_backend(redis_url):
    from tasks.ratelimit import notification_rate_limiter

    webhook = notification_rate_limiter(settings_for(redis_url=redis_url, notify_backend="webhook",
                                                     notify_rate_per_second=1.0))
    smtp = notification_rate_limiter(settings_for(redis_url=redis_url, notify_backend="smtp",
                                                  notify_rate_per_second=1.0))
    assert isinstance(webhook, RedisRateLimiter) and webhook.key != smtp.key
    assert webhook.reserve(0).granted and smtp.reserve(0).granted  # separate buckets
    assert not webhook.reserve(0).granted


def test_the_same_message_run_twice_at_once_claims_disjoint_rows(db_session, pending_rows):
    """Two runs of one ``notifications.send`` message (same id) each claim with a token of their
    own: neither takes the other's live rows, so no row is sent twice."""
    _org, job_id, users = pending_rows
    first = claim_rows(db_session, job_id, limit=4)
    second = claim_rows(db_session, job_id, limit=1000)
    assert {c.id for c in first}.isdisjoint(c.id for c in second)
    assert len(first) + len(second) == len(users) and first[0].token != second[0].token
