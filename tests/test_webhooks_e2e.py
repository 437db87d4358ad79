"""Webhooks end to end: the real uvicorn API, real worker processes (a ``webhooks`` worker among
them), PostgreSQL, Redis and real HTTP receivers on loopback.

- each receiver gets exactly the subscribed events of its organization, never another's, in order
  per job, every signature valid;
- a receiver answering 500, then 503 with Retry-After, then 200 sees three attempts of one event
  id, spaced as asked; a 4xx fails at once and a redelivery sends the same event id again;
- after its endpoint is deleted a receiver sees nothing more;
- a receiver that hangs does not delay a reset, even with one worker consuming every queue.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from models.db import session_scope
from models.schema import CourseAssignment, WebhookDelivery, WebhookEndpoint
from tests.notify_support import wait_until
from tests.test_http_api import (  # noqa: F401 - fixtures
    api_env,
    assert_problem,
    start_api,
    tenants,
    wait_for_state,
)
from tests.webhook_support import Receiver

pytestmark = pytest.mark.e2e

ALL_QUEUES = "resets,reset_batches,notifications,maintenance,webhooks"
EVERYTHING = ["reset.confirmed", "reset.succeeded", "reset.failed", "reset.cancelled"]


@pytest.fixture
def hook_env(api_env, use_env):
    return use_env(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true", WEBHOOKS_TIMEOUT_SECONDS="1",
                   WEBHOOKS_RETRY_BASE_SECONDS="0.3", WEBHOOKS_MAX_ATTEMPTS="4")


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs).start())
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


def subscribe(api, receiver: Receiver, events=EVERYTHING) -> dict:
    created = api.post("/v1/webhooks", json={"url": receiver.url, "events": events})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) >= {"id", "url", "events", "secret"}
    receiver.secrets = [body["secret"]]
    return body


def run_reset(api, tenant, course: int, learner: int | None = None) -> str:
    body = {"actor_id": tenant.admin_id, "course_id": course, "reason": "procedure changed"}
    if learner is not None:
        body["learner_id"] = learner
    req = api.post("/v1/resets", json=body)
    assert req.status_code == 201, req.text
    ok = api.post(f"/v1/resets/{req.json()['request_id']}/confirm",
                  json={"actor_id": tenant.admin_id, "token": req.json()["token"]})
    assert ok.status_code == 202, ok.text
    return req.json()["request_id"]


def a_learner(course: int) -> int:
    with session_scope() as session:
        return session.scalar(select(CourseAssignment.user_id).where(
            CourseAssignment.course_id == course, CourseAssignment.status != "not_started")
            .order_by(CourseAssignment.user_id))


def test_each_receiver_gets_its_organizations_subscribed_events_signed_and_in_order(
        hook_env, tenants, start_api, celery_worker_proc, receivers):
    a, b = tenants.a, tenants.b
    celery_worker_proc(hook_env, queues=ALL_QUEUES, concurrency=2, name="all")
    server = start_api(hook_env)
    ra, ra_ends, rb = receivers(), receivers(), receivers()
    with server.client(a.key) as as_a, server.client(b.key) as as_b:
        ep_a = subscribe(as_a, ra)
        ep_a_ends = subscribe(as_a, ra_ends, ["reset.succeeded", "reset.failed"])
        ep_b = subscribe(as_b, rb, ["reset.confirmed", "reset.succeeded"])
        # Another organization's endpoint does not exist for this key.
        assert_problem(as_b.get(f"/v1/webhooks/{ep_a['id']}"), 404, "not_found")
        assert_problem(as_b.get(f"/v1/webhooks/{ep_a['id']}/deliveries"), 404, "not_found")
        assert_problem(as_b.delete(f"/v1/webhooks/{ep_a['id']}"), 404, "not_found")
        assert [e["id"] for e in as_a.get("/v1/webhooks").json()["items"]] == [ep_a["id"], ep_a_ends["id"]]
        assert "secret" not in as_a.get(f"/v1/webhooks/{ep_a['id']}").json()

        course_job = run_reset(as_a, a, a.course_ids[0])
        learner_job = run_reset(as_a, a, a.course_ids[1], a_learner(a.course_ids[1]))
        b_job = run_reset(as_b, b, b.course_ids[0], a_learner(b.course_ids[0]))
        finals = {job: wait_for_state(client, job) for client, job in
                  ((as_a, course_job), (as_a, learner_job), (as_b, b_job))}
        assert {st["state"] for st in finals.values()} == {"succeeded"}

        wait_until(lambda: len(ra.distinct()) >= 4 and len(ra_ends.distinct()) >= 2 and len(rb.distinct()) >= 2,
                   30, what="every subscribed event to arrive")
        time.sleep(1.0)  # anything extra would arrive now

        got_a = ra.distinct()
        assert all(r.signature_ok for r in ra.got() + ra_ends.got() + rb.got()), "every signature verifies"
        per_job = {}
        for r in got_a:
            assert r.payload["organization_id"] == a.organization_id and r.payload["id"] == r.event_id
            per_job.setdefault(r.payload["data"]["job_id"], []).append(r.event_type)
        assert per_job == {course_job: ["reset.confirmed", "reset.succeeded"],
                           learner_job: ["reset.confirmed", "reset.succeeded"]}, "ordered per job, nothing of B"
        assert sorted((r.payload["data"]["job_id"], r.event_type) for r in ra_ends.distinct()) == sorted(
            [(course_job, "reset.succeeded"), (learner_job, "reset.succeeded")])
        assert [(r.payload["data"]["job_id"], r.event_type) for r in rb.distinct()] == [
            (b_job, "reset.confirmed"), (b_job, "reset.succeeded")]

        done = next(r for r in got_a if r.event_type == "reset.succeeded" and
                    r.payload["data"]["job_id"] == course_job).payload["data"]
        final = finals[course_job]
        assert done["cleared"] == final["cleared"] and done["learners_done"] == final["learners_done"]
        assert (done["actor_id"], done["origin"], done["reason"]) == (a.admin_id, f"http:{a.key_name}",
                                                                     "procedure changed")
        assert done["state"] == "succeeded" and done["finished_at"] == final["finished_at"]

        log = as_a.get(f"/v1/webhooks/{ep_a['id']}/deliveries", params={"limit": 3}).json()
        assert len(log["items"]) == 3 and log["next_cursor"]
        rest = as_a.get(f"/v1/webhooks/{ep_a['id']}/deliveries", params={"cursor": log["next_cursor"]}).json()
        items = log["items"] + rest["items"]
        assert len(items) == 4 and all(x["status"] == "delivered" and x["last_status_code"] == 200 for x in items)
        assert {x["event_id"] for x in items} == {r.event_id for r in got_a}


def test_retries_with_the_same_event_id_then_failure_redelivery_and_deletion(
        hook_env, tenants, start_api, celery_worker_proc, receivers):
    a = tenants.a
    celery_worker_proc(hook_env, queues=ALL_QUEUES, concurrency=2, name="all")
    server = start_api(hook_env)
    flaky = receivers(script=[500, (503, {"Retry-After": "2"})])
    refusing = receivers(script=[410])
    deleted = receivers()
    with server.client(a.key) as api:
        ep_flaky = subscribe(api, flaky, ["reset.confirmed"])
        ep_refusing = subscribe(api, refusing, ["reset.confirmed"])
        ep_deleted = subscribe(api, deleted)
        gone = api.delete(f"/v1/webhooks/{ep_deleted['id']}")
        assert gone.status_code == 200 and gone.json()["deleted_at"]
        assert_problem(api.delete(f"/v1/webhooks/{ep_deleted['id']}"), 404, "not_found")

        job = run_reset(api, a, a.course_ids[1], a_learner(a.course_ids[1]))
        assert wait_for_state(api, job)["state"] == "succeeded"
        wait_until(lambda: len(flaky.got()) >= 3, 30, what="the third attempt")
        attempts = flaky.got()
        assert len({r.event_id for r in attempts}) == 1 and [r.attempt for r in attempts] == [1, 2, 3]
        assert [r.status for r in attempts] == [500, 503, 200] and all(r.signature_ok for r in attempts)
        assert len({str(r.payload) for r in attempts}) == 1, "the same body every attempt"
        assert attempts[2].at - attempts[1].at >= 1.9, "Retry-After: 2 honoured"

        log = wait_until(lambda: [x for x in api.get(f"/v1/webhooks/{ep_refusing['id']}/deliveries").json()[
            "items"] if x["status"] == "failed"], 20, what="the 410 to fail the delivery")
        assert (log[0]["attempts"], log[0]["last_status_code"]) == (1, 410), "4xx fails at once"
        flaky_log = api.get(f"/v1/webhooks/{ep_flaky['id']}/deliveries").json()["items"]
        assert [(x["status"], x["attempts"], x["last_status_code"]) for x in flaky_log] == [("delivered", 3, 200)]

        again = api.post(f"/v1/webhooks/{ep_refusing['id']}/deliveries/{log[0]['delivery_id']}/redeliver")
        assert again.status_code == 202, again.text
        wait_until(lambda: len(refusing.got()) >= 2, 20, what="the redelivery")
        first, second = refusing.got()[:2]
        assert first.event_id == second.event_id and second.status == 200
        assert_problem(api.post(f"/v1/webhooks/{ep_refusing['id']}/deliveries/999999/redeliver"), 404, "not_found")

        # Bad input: one-line 4xx, nothing written.
        with session_scope() as session:
            before = session.scalar(select(func.count()).select_from(WebhookEndpoint))
        for body, status in (({"url": "http://10.0.0.5/x", "events": EVERYTHING}, 422),
                             ({"url": "https://user:pw@93.184.216.34/", "events": EVERYTHING}, 422),
                             ({"url": "ftp://x", "events": EVERYTHING}, 422),
                             ({"url": flaky.url, "events": ["reset.started"]}, 422),
                             ({"url": flaky.url, "events": []}, 422),
                             ({"url": flaky.url}, 422),
                             ({"url": flaky.url, "events": EVERYTHING, "secret": "mine"}, 422)):
            refused = assert_problem(api.post("/v1/webhooks", json=body), status, "validation_failed")
            assert "\n" not in refused["detail"]
        assert_problem(api.get("/v1/webhooks/0"), 422, "validation_failed")
        assert_problem(api.get("/v1/webhooks/99999"), 404, "not_found")
        with session_scope() as session:
            assert session.scalar(select(func.count()).select_from(WebhookEndpoint)) == before
            assert session.scalar(select(func.count()).select_from(WebhookDelivery).where(
                WebhookDelivery.endpoint_id == ep_deleted["id"])) == 0
    assert deleted.got() == [], "nothing after the endpoint was deleted"


def test_a_hanging_receiver_does_not_delay_a_reset(hook_env, tenants, start_api, celery_worker_proc, receivers):
    a = tenants.a
    # One worker process pair on every queue: the worst topology for a slow receiver.
    celery_worker_proc(hook_env, queues=ALL_QUEUES, concurrency=2, name="all")
    server = start_api(hook_env)
    hanging = receivers(hang=True, hang_seconds=60)
    with server.client(a.key) as api:
        subscribe(api, hanging)
        started = time.monotonic()
        job = run_reset(api, a, a.course_ids[0])
        st = wait_for_state(api, job, timeout=30)
        took = time.monotonic() - started
        assert st["state"] == "succeeded" and st["learners_done"] == st["learners_total"]
        wait_until(lambda: len(hanging.got()) >= 2, 20, what="the receiver to be tried again")
    print(f"\ncourse reset of {st['learners_total']} learners with a hanging receiver: {took:.1f}s; "
          f"{len(hanging.got())} attempts held")
    assert took < 20, f"the reset took {took:.1f}s while the receiver hung"
    with session_scope() as session:
        errors = set(session.scalars(select(WebhookDelivery.last_error).where(
            WebhookDelivery.last_error.is_not(None))))
    assert errors == {"no complete answer within 1s"}, errors


def test_cli_manages_endpoints_like_the_api(hook_env, tenants):
    import json

    from tests.test_http_api import run_cli

    org = str(tenants.a.organization_id)
    made = run_cli(hook_env, "webhook", "create", "--organization", org, "--url", "http://127.0.0.1:9/x",
                   "--event", "reset.succeeded", "--event", "reset.failed", "--json")
    assert made.returncode == 0, made.stderr
    ep = json.loads(made.stdout)
    assert ep["events"] == ["reset.succeeded", "reset.failed"] and ep["secret"].startswith("whsec_")
    listed = json.loads(run_cli(hook_env, "webhook", "list", "--organization", org, "--json").stdout)
    assert [x["id"] for x in listed["items"]] == [ep["id"]] and "secret" not in listed["items"][0]
    rotated = json.loads(run_cli(hook_env, "webhook", "rotate-secret", str(ep["id"]), "--organization", org,
                                 "--overlap-seconds", "60", "--json").stdout)
    assert rotated["secret"] != ep["secret"] and rotated["previous_secret_expires_at"]
    log = json.loads(run_cli(hook_env, "webhook", "deliveries", str(ep["id"]), "--organization", org,
                             "--json").stdout)
    assert log == {"items": [], "next_cursor": None}
    other = str(tenants.b.organization_id)
    for args, fragment in ((["show", str(ep["id"]), "--organization", other], f"webhook endpoint {ep['id']} not "
                                                                              "found"),
                           (["create", "--organization", org, "--url", "https://10.0.0.1/x", "--event",
                             "reset.failed"], "webhook URL"),
                           (["create", "--organization", org, "--url", "https://10.0.0.1/x", "--event",
                             "reset.started"], "argument --event")):
        refused = run_cli({**hook_env, "WEBHOOKS_ALLOW_HTTP_LOOPBACK": "false"}, "webhook", *args)
        assert refused.returncode != 0 and fragment in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    gone = run_cli(hook_env, "webhook", "delete", str(ep["id"]), "--organization", org)
    assert gone.returncode == 0 and "deleted" in gone.stdout
    assert json.loads(run_cli(hook_env, "webhook", "list", "--organization", org, "--json").stdout)["items"] == []
