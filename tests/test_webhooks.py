"""Webhooks, tiers (a) and (b): the outbox written with the state change, claims, outcomes,
signatures and URL checks, against real PostgreSQL (rolled back) and a real HTTP receiver."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from models.errors import Conflict, NotFound, ValidationFailed
from models.receiver_urls import check_url
from models.schema import CourseAssignment, WebhookDelivery, WebhookEndpoint, WebhookEvent
from models.seed import seed
from models.settings import get_settings
from models.times import utcnow
from producer import resets, webhooks
from tasks.webhooks import deliveries, sending, sweep, wakeups
from tasks.webhooks.signing import body_bytes, signature_header, verify_signature
from tests.webhook_support import Receiver

EVERYTHING = ["reset.confirmed", "reset.succeeded", "reset.failed", "reset.cancelled"]


@pytest.fixture
def loopback(use_env):
    use_env(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true", WEBHOOKS_TIMEOUT_SECONDS="0.5", WEBHOOKS_MAX_ATTEMPTS="3",
            WEBHOOKS_RETRY_BASE_SECONDS="0.2")
    return get_settings()


def one_learner(session, org, course):
    return session.scalar(select(CourseAssignment.user_id).where(
        CourseAssignment.course_id == course, CourseAssignment.status != "not_started")
        .order_by(CourseAssignment.user_id))


def confirm_learner_reset(session, org, course=None):
    course = course or org.course_ids[0]
    req = resets.request(session, org.admin_id, course, learner_id=one_learner(session, org, course),
                         reason="incident 12")
    return resets.confirm(session, req.request_id, org.admin_id, req.token).job_id


# --- receiver URLs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url, fragment", [
    ("ftp://example.com/x", "must be an https:// URL"),
    ("not a url", "https:// URL"),
    ("https://", "with a host"),
    ("http://93.184.216.34/hook", "must use https"),
    ("https://10.1.2.3/hook", "not a public address"),
    ("https://192.168.0.10/hook", "not a public address"),
    ("https://169.254.169.254/latest/meta-data", "not a public address"),
    ("https://127.0.0.1:8443/hook", "not a public address"),
    ("https://[::1]/hook", "not a public address"),
    ("https://[fe80::1]/hook", "not a public address"),
    ("https://0.0.0.0/hook", "not a public address"),
    ("https://localhost/hook", "not a public address"),
    ("https://user:pw@93.184.216.34/hook", "must not carry credentials"),
    ("https://93.184.216.34:99999/hook", "malformed"),
    ("https://no-such-host.invalid/hook", "does not resolve"),
    ("https://93.184.216.34/" + "x" * 2000, "at most 2000"),
])
def test_receiver_urls_that_are_refused(url, fragment):
    with pytest.raises(ValidationFailed) as refused:
        check_url(url, allow_http_loopback=False)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the cloud metadata service
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "::127.0.0.1",  # IPv4-compatible
    "::ffff:10.0.0.1",  # IPv4-mapped
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "100.64.0.1",  # carrier-grade NAT
    "198.18.0.1",  # benchmarking
    "240.0.0.1",  # reserved
    "224.0.0.1",  # multicast
])
def test_item7_addresses_that_carry_a_private_ipv4_are_refused(address):
    with pytest.raises(ValidationFailed, match="not a public address") as refused:
        check_url(f"https://[{address}]/hook" if ":" in address else f"https://{address}/hook",
                  allow_http_loopback=False)
    assert "\n" not in str(refused.value)


def test_item7_a_public_ipv6_address_and_its_nat64_of_a_public_ipv4_are_accepted():
    assert check_url("https://[2606:4700::1111]/hook", allow_http_loopback=False).addresses == ("2606:4700::1111",)
    assert check_url("https://[64:ff9b::5db8:d822]/hook", allow_http_loopback=False)  # 93.184.216.34


def test_item7_the_delivery_connects_to_the_address_that_was_checked(loopback, monkeypatch):
    """A name that answers 127.0.0.1 to the check and somewhere else afterwards (DNS rebinding)
    is still reached at the checked address: the delivery never resolves the name again."""
    import socket as socket_module

    receiver = Receiver(secrets=["s3cret"]).start()
    answers = {"rebind.example": "127.0.0.1"}
    real_getaddrinfo = socket_module.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            address = answers[host]
            answers[host] = "192.0.2.1"  # the next answer: a documentation address nobody serves
            return [(socket_module.AF_INET, socket_module.SOCK_STREAM, 6, "", (address, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", getaddrinfo)
    try:
        url = receiver.url.replace("127.0.0.1", "rebind.example")
        outcome = sending.send_delivery(_claimed(url), loopback)
        assert outcome.delivered, outcome
        assert answers["rebind.example"] == "192.0.2.1", "resolved once, for the check"
        assert len(receiver.got()) == 1 and receiver.got()[0].signature_ok
    finally:
        receiver.stop()


def test_receiver_urls_that_are_accepted():
    assert check_url("https://93.184.216.34/hook?x=1", allow_http_loopback=False)
    # Development and tests: http to loopback, and private addresses, only with the setting on.
    assert check_url("http://127.0.0.1:9000/hook", allow_http_loopback=True)
    assert check_url("https://10.1.2.3/hook", allow_http_loopback=True)
    with pytest.raises(ValidationFailed, match="must use https"):
        check_url("http://10.1.2.3/hook", allow_http_loopback=True)


# --- signatures ------------------------------------------------------------------------------------

def test_signature_is_hmac_of_timestamp_dot_body_and_both_secrets_sign_during_rotation():
    body = body_bytes({"id": "e1", "type": "reset.succeeded"})
    now = int(time.time())
    header = signature_header(["new-secret", "old-secret"], now, body)
    assert header.startswith(f"t={now},v1=") and header.count("v1=") == 2
    assert verify_signature("new-secret", header, body, now) and verify_signature("old-secret", header, body, now)
    assert not verify_signature("other", header, body, now)
    assert not verify_signature("new-secret", header, body + b" ", now)
    assert not verify_signature("new-secret", header, body, now + 301), "older than 5 minutes is refused"


# --- the outbox, in the state change's transaction --------------------------------------------------

def test_confirm_and_cancel_write_events_for_subscribed_endpoints_of_the_organization(db_session, loopback):
    org = seed(db_session, learners=20, lessons=2, courses=2, random_seed=3)
    other = seed(db_session, learners=5, lessons=2, courses=1, random_seed=4)
    everything = webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", EVERYTHING)
    ends_only = webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/b",
                                         ["reset.succeeded", "reset.failed"])
    gone = webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/c", EVERYTHING)
    webhooks.delete_endpoint(db_session, org.organization_id, gone["id"])
    theirs = webhooks.create_endpoint(db_session, other.organization_id, "http://127.0.0.1:9/d", EVERYTHING)
    assert everything["secret"].startswith("whsec_") and "secret" not in webhooks.get_endpoint(
        db_session, org.organization_id, everything["id"])

    job_id = confirm_learner_reset(db_session, org)
    resets.cancel(db_session, job_id, org.admin_id)
    events = db_session.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at)).all()
    assert [e.type for e in events] == ["reset.confirmed", "reset.cancelled"]
    for event in events:
        assert event.payload["id"] == str(event.id) and event.payload["type"] == event.type
        data = event.payload["data"]
        assert data["job_id"] == job_id and data["actor_id"] == org.admin_id and data["reason"] == "incident 12"
        assert data["origin"] == "python" and data["scope"] == "learner" and set(data["notifications"]) == {
            "pending", "sent", "failed"}
    assert events[1].payload["data"]["state"] == "cancelled"
    rows = db_session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.event_id)).all()
    assert {r.endpoint_id for r in rows} == {everything["id"]}, "not the end-only, deleted or other org's endpoint"
    assert len(rows) == 2
    assert theirs["id"] not in {r.endpoint_id for r in rows}


def test_a_rolled_back_state_change_leaves_no_event(db_session, loopback):
    org = seed(db_session, learners=10, lessons=2, courses=1, random_seed=5)
    webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", EVERYTHING)
    before = db_session.scalar(select(func.count()).select_from(WebhookEvent))
    with pytest.raises(RuntimeError):
        with db_session.begin_nested():
            confirm_learner_reset(db_session, org)
            raise RuntimeError("the confirm's transaction fails after the audit record")
    assert db_session.scalar(select(func.count()).select_from(WebhookEvent)) == before


def test_endpoint_management_refuses_bad_input_and_other_organizations(db_session, loopback):
    org = seed(db_session, learners=5, lessons=2, courses=1, random_seed=6)
    other = seed(db_session, learners=5, lessons=2, courses=1, random_seed=7)
    ep = webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", ["reset.succeeded"])
    count = db_session.scalar(select(func.count()).select_from(WebhookEndpoint))
    for events in ([], ["reset.started"], "reset.succeeded"):
        with pytest.raises(ValidationFailed):
            webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", events)
    with pytest.raises(NotFound):
        webhooks.create_endpoint(db_session, 999_999, "http://127.0.0.1:9/a", ["reset.succeeded"])
    for call in (lambda: webhooks.get_endpoint(db_session, other.organization_id, ep["id"]),
                 lambda: webhooks.delete_endpoint(db_session, other.organization_id, ep["id"]),
                 lambda: webhooks.rotate_secret(db_session, other.organization_id, ep["id"]),
                 lambda: webhooks.list_deliveries(db_session, other.organization_id, ep["id"]),
                 lambda: webhooks.redeliver(db_session, org.organization_id, ep["id"], 123456),
                 lambda: webhooks.get_endpoint(db_session, org.organization_id, 999_999)):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(ValidationFailed):
        webhooks.rotate_secret(db_session, org.organization_id, ep["id"], overlap_seconds=-1)
    assert db_session.scalar(select(func.count()).select_from(WebhookEndpoint)) == count

    rotated = webhooks.rotate_secret(db_session, org.organization_id, ep["id"], overlap_seconds=600)
    row = db_session.get(WebhookEndpoint, ep["id"])
    assert rotated["secret"] != ep["secret"] and row.previous_secret == ep["secret"]
    assert rotated["previous_secret_expires_at"]

    for _ in range(webhooks.MAX_ENDPOINTS_PER_ORGANIZATION - 1):
        webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", ["reset.failed"])
    with pytest.raises(Conflict, match="the most allowed"):
        webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", ["reset.failed"])


# --- claims and outcomes --------------------------------------------------------------------------

def _two_events_one_job(db_session, org):
    ep = webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", EVERYTHING)
    job_id = confirm_learner_reset(db_session, org)
    resets.cancel(db_session, job_id, org.admin_id)
    db_session.flush()
    return ep["id"], job_id


def test_deliveries_of_one_job_are_claimed_in_order_and_outcomes_follow_the_rules(db_session, loopback):
    org = seed(db_session, learners=10, lessons=2, courses=1, random_seed=8)
    endpoint_id, _job = _two_events_one_job(db_session, org)
    settings = get_settings()
    now = utcnow()
    first = deliveries.claim_next_delivery(db_session, endpoint_id, now, settings)
    assert first.event_type == "reset.confirmed" and first.attempt == 1
    # The cancelled event waits while the confirmed one is being sent, or waits for its retry.
    assert deliveries.claim_next_delivery(db_session, endpoint_id, now, settings) is None
    assert deliveries.record_outcome(db_session, first, deliveries.AttemptOutcome(False, True, 503, "HTTP 503",
                                                                       retry_after=30), now, settings) == "pending"
    assert deliveries.claim_next_delivery(db_session, endpoint_id, now + timedelta(seconds=5), settings) is None
    assert wakeups.next_wake(db_session, endpoint_id, now) >= now + timedelta(seconds=29), "Retry-After honoured"
    again = deliveries.claim_next_delivery(db_session, endpoint_id, now + timedelta(seconds=31), settings)
    assert again.delivery_id == first.delivery_id and again.attempt == 2
    # A late answer to an attempt that was taken over changes nothing.
    assert deliveries.record_outcome(db_session, first, deliveries.AttemptOutcome(True, False, 200), now, settings) == "stale"
    assert deliveries.record_outcome(db_session, again, deliveries.AttemptOutcome(True, False, 200), now, settings) == \
        "delivered"
    second = deliveries.claim_next_delivery(db_session, endpoint_id, now + timedelta(seconds=31), settings)
    assert second.event_type == "reset.cancelled"
    # 410 fails at once; a lease that ran out makes the delivery claimable again (same event id).
    assert deliveries.record_outcome(db_session, second, deliveries.AttemptOutcome(False, False, 410, "HTTP 410"), now,
                                   settings) == "failed"
    log = webhooks.list_deliveries(db_session, org.organization_id, endpoint_id)["items"]
    assert [(x["event_type"], x["status"], x["attempts"], x["last_status_code"]) for x in log] == [
        ("reset.cancelled", "failed", 1, 410), ("reset.confirmed", "delivered", 2, 200)]
    redone = webhooks.redeliver(db_session, org.organization_id, endpoint_id, log[0]["delivery_id"])
    assert redone["status"] == "pending" and redone["attempts"] == 0
    with pytest.raises(Conflict):
        webhooks.redeliver(db_session, org.organization_id, endpoint_id, log[0]["delivery_id"])
    claimed = deliveries.claim_next_delivery(db_session, endpoint_id, utcnow(), settings)
    assert claimed.event_id == second.event_id
    later = utcnow() + timedelta(seconds=deliveries.lease_seconds(settings) + 1)
    taken_over = deliveries.claim_next_delivery(db_session, endpoint_id, later, settings)
    assert taken_over.event_id == second.event_id and taken_over.attempt == 2
    # Retryable failures stop at WEBHOOKS_MAX_ATTEMPTS (3 here).
    assert deliveries.record_outcome(db_session, taken_over, deliveries.AttemptOutcome(False, True, 500), later,
                                   settings) == "pending"
    last = deliveries.claim_next_delivery(db_session, endpoint_id, later + timedelta(hours=1), settings)
    assert last.attempt == 3
    assert deliveries.record_outcome(db_session, last, deliveries.AttemptOutcome(False, True, 500), later, settings) == "failed"


def test_deleting_an_endpoint_cancels_its_open_deliveries(db_session, loopback):
    org = seed(db_session, learners=10, lessons=2, courses=1, random_seed=9)
    endpoint_id, _job = _two_events_one_job(db_session, org)
    webhooks.delete_endpoint(db_session, org.organization_id, endpoint_id)
    assert deliveries.claim_next_delivery(db_session, endpoint_id, utcnow() + timedelta(hours=1)) is None
    statuses = db_session.scalars(select(WebhookDelivery.status).where(WebhookDelivery.endpoint_id == endpoint_id))
    assert set(statuses) == {"cancelled"}


# --- the HTTP call, against a real receiver -------------------------------------------------------------

def _claimed(url: str, secrets=("s3cret",)) -> deliveries.ClaimedDelivery:
    event_id = uuid.uuid4()
    return deliveries.ClaimedDelivery(1, 1, 1, url, list(secrets), event_id, "reset.succeeded",
                                    {"id": str(event_id), "type": "reset.succeeded", "data": {"job_id": "j"}})


@pytest.mark.parametrize("script, delivered, retryable, retry_after", [
    ([200], True, False, None),
    ([204], True, False, None),
    ([500], False, True, None),
    ([(503, {"Retry-After": "7"})], False, True, 7.0),
    ([429], False, True, None),
    ([408], False, True, None),
    ([410], False, False, None),
    ([400], False, False, None),
    ([(302, {"Location": "http://169.254.169.254/"})], False, False, None),
])
def test_answers_are_classified(loopback, script, delivered, retryable, retry_after):
    receiver = Receiver(script=list(script), secrets=["s3cret"]).start()
    try:
        outcome = sending.send_delivery(_claimed(receiver.url), loopback)
        assert (outcome.delivered, outcome.retryable, outcome.retry_after) == (delivered, retryable, retry_after)
        got = receiver.got()
        assert len(got) == 1 and got[0].signature_ok and got[0].event_type == "reset.succeeded"
    finally:
        receiver.stop()


def test_a_hanging_or_absent_receiver_is_a_retryable_failure_within_the_timeout(loopback):
    receiver = Receiver(hang=True, hang_seconds=10).start()
    try:
        started = time.monotonic()
        outcome = sending.send_delivery(_claimed(receiver.url), loopback)
        assert outcome.retryable and outcome.error == "no complete answer within 0.5s"
        assert time.monotonic() - started < 2.0, "WEBHOOKS_TIMEOUT_SECONDS=0.5 bounds the attempt"
    finally:
        receiver.stop()
    outcome = sending.send_delivery(_claimed(receiver.url), loopback)  # nobody listens any more
    assert outcome.retryable and not outcome.delivered
    refused = sending.send_delivery(_claimed("http://127.0.0.1:1/x"), get_settings().with_overrides(
        webhooks_allow_http_loopback=False))
    assert not refused.retryable and refused.error.startswith("refused:")



def test_sweep_republishes_due_deliveries_once_and_wake_ups_do_not_multiply(db_session, loopback):
    org = seed(db_session, learners=10, lessons=2, courses=1, random_seed=10)
    endpoint_id, _job = _two_events_one_job(db_session, org)
    settings = get_settings()
    now = utcnow()
    assert sweep.sweep_webhooks(db_session, now, settings) == 0, "just published after the commit"
    later = now + timedelta(seconds=settings.publish_stale_seconds + 1)
    assert sweep.sweep_webhooks(db_session, later, settings) == 1
    assert sweep.sweep_webhooks(db_session, later, settings) == 0, "not twice in a row"

    claimed = deliveries.claim_next_delivery(db_session, endpoint_id, later, settings)
    lease_end = later + timedelta(seconds=deliveries.lease_seconds(settings))
    # A killed sender's lease: one wake-up for its end, not one per run that finds it.
    countdown = wakeups.schedule_wake(db_session, endpoint_id, later)
    assert countdown == pytest.approx((lease_end - later).total_seconds(), abs=0.01)
    assert wakeups.schedule_wake(db_session, endpoint_id, later) is None
    after_lease = lease_end + timedelta(seconds=settings.publish_stale_seconds + 1)
    assert sweep.sweep_webhooks(db_session, after_lease, settings) == 1, "an ended lease is re-published"
    assert deliveries.claim_next_delivery(db_session, endpoint_id, after_lease, settings).event_id == claimed.event_id

    # A retry hours away is bridged by wake-ups of at most a minute.
    retry = deliveries.claim_next_delivery(db_session, endpoint_id, after_lease + timedelta(hours=1), settings)
    db_session.execute(update(deliveries.d).where(deliveries.d.c.id == retry.delivery_id).values(
        status="pending", next_attempt_at=after_lease + timedelta(hours=3)))
    assert wakeups.schedule_wake(db_session, endpoint_id, after_lease) == wakeups.MAX_WAKE_SECONDS


def test_a_campaign_occurrence_is_the_reset_confirmed_event_of_its_job(db_session, loopback):
    from datetime import datetime, timezone

    from models.campaign_dispatch import dispatch_due
    from tests.test_campaigns_support import add_learner, confirmed_campaign, make_org

    now = datetime(2025, 3, 3, 10, 0, tzinfo=timezone.utc)
    org = make_org(db_session)
    add_learner(db_session, org, org.course_ids[0], "old", completed_at=now - timedelta(days=400))
    ep = webhooks.create_endpoint(db_session, org.organization_id, "http://127.0.0.1:9/a", ["reset.confirmed"])
    campaign_id = confirmed_campaign(db_session, org, org.course_ids[0], now, cron="0 9 * * *", time_zone="UTC")
    [outcome] = dispatch_due(db_session, datetime(2025, 3, 4, 9, 0, 20, tzinfo=timezone.utc)).outcomes
    [event] = db_session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == outcome.job_id)).all()
    data = event.payload["data"]
    assert event.type == "reset.confirmed" and (data["origin"], data["campaign_id"], data["state"]) == (
        "campaign", campaign_id, "queued")
    assert db_session.scalars(select(WebhookDelivery.endpoint_id).where(
        WebhookDelivery.event_id == event.id)).all() == [ep["id"]]
