"""Issue 18 over HTTP: a real uvicorn (``progress-reset serve``), a real client, real PostgreSQL.

Item 3 (a NUL byte in a query parameter), item 4 (unknown and repeated query parameters,
list filters) and item 5 (a replayed Idempotency-Key keeps the first token valid).
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, inspect, select

from models.db import get_engine, session_scope
from models.jobs import utcnow
from models.schema import AuditEvent, ResetJob
from producer import resets, webhooks
from tests.listing_support import insert_jobs
from tests.reset_checks import fingerprint
from tests.test_cli_foundation import invoke
from tests.test_http_api import api_env, assert_problem, start_api, tenants  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e


def unchanged():
    with session_scope() as session:
        return fingerprint(session)


@pytest.fixture
def endpoint(tenants, use_env):
    """A webhook endpoint of organization A (for its delivery log)."""
    use_env(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true")
    with session_scope() as session:
        return webhooks.create_endpoint(session, tenants.a.organization_id, "http://127.0.0.1:9/hook",
                                        ["reset.succeeded"])["id"]


def assert_no_server_error(server) -> None:
    """Every request was answered below 500, and nothing was logged as an error."""
    records = server.log_events()
    assert {r["status"] for r in records if r.get("event") == "http.request"} <= set(range(200, 500))
    assert not [r for r in records if r.get("level") in ("error", "critical")], records


# --- item 3: a NUL byte in a query parameter ---------------------------------------------------

def test_item3_nul_in_any_query_parameter_is_422_and_no_server_error(api_env, tenants, start_api, endpoint):
    a = tenants.a
    server = start_api(api_env)
    before = unchanged()
    cases = [
        ("/v1/resets", "origin=a%00b", "origin"),
        ("/v1/resets", "state=queued&state=a%00b", "state"),
        ("/v1/resets", "created_after=2026-01-01%00", "created_after"),
        ("/v1/resets", "cursor=WyIy%00", "cursor"),
        ("/v1/audit", "from=2026-01-01&to=2026-07-01&action=a%00b", "action"),
        ("/v1/audit", "from=2026-01-01%00", "from"),
        (f"/v1/webhooks/{endpoint}/deliveries", "status=a%00b", "status"),
        ("/v1/campaigns", f"actor_id={a.admin_id}&course_id=1%00", "course_id"),
    ]
    with server.client(a.key) as api:
        for path, query, name in cases:
            problem = assert_problem(api.get(f"{path}?{query}"), 422, "validation_failed")
            assert problem["detail"].startswith(f"query parameter {name} contains the NUL character"), problem
        # A NUL in a parameter's name is as unknown as any other name.
        problem = assert_problem(api.get("/v1/resets?a%00b=1"), 422, "validation_failed")
        assert "unknown query parameter 'a\\x00b'" in problem["detail"]
    assert unchanged() == before
    assert_no_server_error(server)
    answered = [r["status"] for r in server.log_events("http.request") if r["route"] != "/healthz"]
    assert answered == [422] * (len(cases) + 1)


# --- item 4: unknown and repeated query parameters, list filters --------------------------------

def test_item4_unknown_query_parameters_are_422_naming_them(api_env, tenants, start_api, endpoint):
    a = tenants.a
    server = start_api(api_env)
    with session_scope() as session:
        insert_jobs(session, a.organization_id, a.course_ids[0], a.admin_id, 5)
    with server.client(a.key) as api:
        made = api.post("/v1/campaigns", json={"actor_id": a.admin_id, "course_id": a.course_ids[1],
                                               "cron": "0 9 * * 1"})
        assert made.status_code == 201, made.text
        campaign = made.json()["campaign_id"]
        before = unchanged()
        actor = f"actor_id={a.admin_id}"
        cases = [
            ("GET", "/v1/resets?colour=red", "'colour'", ""),
            ("GET", f"/v1/resets?course={a.course_ids[0]}", "'course'", "did you mean course_id?"),
            ("GET", "/v1/resets?colour=red&limit=5&shape=round", "'colour', 'shape'", ""),
            ("GET", "/v1/audit?actions=reset.confirmed", "'actions'", "did you mean action?"),
            ("GET", f"/v1/webhooks/{endpoint}/deliveries?state=failed", "'state'", "did you mean status?"),
            ("GET", f"/v1/campaigns?{actor}&courses=1", "'courses'", "did you mean course_id?"),
            ("GET", f"/v1/campaigns/{campaign}?{actor}&verbose=1", "'verbose'", ""),
            ("DELETE", f"/v1/campaigns/{campaign}?{actor}&force=1", "'force'", ""),
            ("GET", "/v1/webhooks?all=1", "'all'", "takes no query parameters"),
            ("GET", f"/v1/resets/{'0' * 8}-0000-0000-0000-{'0' * 12}?expand=1", "'expand'", ""),
            ("POST", "/v1/resets?dry_run=1", "'dry_run'", ""),
        ]
        for method, url, named, hint in cases:
            body = {"actor_id": a.admin_id, "course_id": a.course_ids[0]} if method == "POST" else None
            problem = assert_problem(api.request(method, url, json=body), 422, "validation_failed")
            assert "unknown query parameter" in problem["detail"] and named in problem["detail"], problem
            assert hint in problem["detail"], problem
        listed = assert_problem(api.get("/v1/resets?colour=red"), 422, "validation_failed")["detail"]
        assert listed.endswith("takes course_id, learner_id, state, origin, campaign_id, created_after, "
                               "created_before, limit, cursor"), listed
        assert unchanged() == before  # the DELETE and the POST changed nothing
        assert api.get(f"/v1/campaigns/{campaign}?{actor}").json()["state"] != "deleted"
        assert len(api.get("/v1/resets").json()["items"]) == 5
    assert_no_server_error(server)


def test_item4_repeated_single_value_parameters_are_422_naming_them(api_env, tenants, start_api, endpoint):
    a = tenants.a
    server = start_api(api_env)
    actor = f"actor_id={a.admin_id}"
    with server.client(a.key) as api:
        for url, named in (("/v1/resets?limit=5&limit=6", "'limit'"),
                           ("/v1/resets?created_after=2026-01-01&created_after=2026-02-01", "'created_after'"),
                           ("/v1/resets?cursor=a&cursor=b", "'cursor'"),
                           ("/v1/audit?from=2026-01-01&from=2026-02-01&to=2026-03-01&to=2026-04-01",
                            "'from', 'to'"),
                           (f"/v1/webhooks/{endpoint}/deliveries?limit=1&limit=1", "'limit'"),
                           (f"/v1/campaigns?{actor}&{actor}", "'actor_id'"),
                           (f"/v1/campaigns?{actor}&include_deleted=true&include_deleted=false",
                            "'include_deleted'")):
            problem = assert_problem(api.get(url), 422, "validation_failed")
            assert problem["detail"] == f"query parameter {named} given more than once; it takes one value", \
                problem
    assert_no_server_error(server)


def newest_first(session, organization_id, **filters) -> list[str]:
    j = ResetJob.__table__.c
    query = select(j.id).where(j.organization_id == organization_id)
    for name, values in filters.items():
        query = query.where(j[name].in_(values))
    return [str(i) for i in session.scalars(query.order_by(j.created_at.desc(), j.id.desc()))]


def walk(api, limit: int, **params) -> list[str]:
    seen, cursor = [], None
    while True:
        page = api.get("/v1/resets", params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen.extend(item["job_id"] for item in page.json()["items"])
        cursor = page.json()["next_cursor"]
        if not cursor:
            return seen


def test_item4_list_filters_take_several_values_and_page_exactly(api_env, tenants, start_api):
    a, b = tenants.a, tenants.b
    start = utcnow() - timedelta(days=10)
    with session_scope() as session:
        # Four states in turn, three jobs per instant (ties broken by id), on two courses, and another
        # organization's jobs that must never show.
        insert_jobs(session, a.organization_id, a.course_ids[0], a.admin_id, 120, start=start)
        insert_jobs(session, a.organization_id, a.course_ids[1], a.admin_id, 80, start=start, origin="cli")
        insert_jobs(session, b.organization_id, b.course_ids[0], b.admin_id, 40, start=start)
        two_states = newest_first(session, a.organization_id, state=["succeeded", "failed"])
        two_courses = newest_first(session, a.organization_id, course_id=a.course_ids[:2], state=["expired"])
        origins = newest_first(session, a.organization_id, origin=["cli", "bulk"], state=["failed", "cancelled"])
    assert len(two_states) == 100 and len(two_courses) == 50 and len(origins) == 100
    server = start_api(api_env)
    with server.client(a.key) as api:
        for limit in (7, 200):
            assert walk(api, limit, state=["succeeded", "failed"]) == two_states
            assert walk(api, limit, course_id=a.course_ids[:2], state="expired") == two_courses
            assert walk(api, limit, origin=["cli", "bulk"], state=["failed", "cancelled"]) == origins
        # One value is the filter it always was; a repeated value counts once.
        assert walk(api, 50, state=["succeeded", "succeeded"]) == walk(api, 50, state="succeeded")
        assert len(walk(api, 50, state="succeeded")) == 50
        for params, fragment in (({"state": ["succeeded", "done"]}, "state must be one of"),
                                 ({"course_id": ["1", "x"]}, "course_id"),
                                 ({"state": ["queued"] * 21}, "state")):
            problem = assert_problem(api.get("/v1/resets", params=params), 422, "validation_failed")
            assert fragment in problem["detail"], problem
        audit = api.get("/v1/audit", params={"action": ["api_key.created", "webhook.created"]})
        assert audit.status_code == 200 and {e["action"] for e in audit.json()["items"]} == {"api_key.created"}
    with server.client(b.key) as api:
        assert walk(api, 200, state=["succeeded", "failed"], course_id=[a.course_ids[0], b.course_ids[0]]) \
            and not set(walk(api, 200, state=["succeeded", "failed"])) & set(two_states)
    assert_no_server_error(server)

    # The CLI's jobs list takes the same filters, repeated.
    listed = invoke("jobs", "list", "--organization", str(a.organization_id), "--state", "succeeded",
                    "--state", "failed", "--limit", "200", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [i["job_id"] for i in json.loads(listed.stdout)["items"]] == two_states


# --- item 5: replaying an Idempotency-Key -------------------------------------------------------

def stored_request(request_id: str) -> ResetJob:
    with session_scope() as session:
        job = session.get(ResetJob, uuid.UUID(request_id))
        session.expunge(job)
        return job


def test_item5_replay_returns_the_same_answer_and_the_first_token_stays_valid(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    body = {"actor_id": a.admin_id, "course_id": a.course_ids[0], "reason": "procedure changed"}
    key = {"Idempotency-Key": "7f1c9a52-5d0e-4b8e-9a57-0c1f3e6b2d44"}
    with server.client(a.key) as api:
        first = api.post("/v1/resets", json=body, headers=key)
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers, first.text
        req = first.json()
        assert req["replayed"] is False and req["token"]
        before = unchanged()
        for _ in range(2):
            again = api.post("/v1/resets", json=body, headers=key)
            assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true", again.text
            assert again.json() == {**req, "replayed": True}  # same request, same token, same expiry
        assert unchanged() == before  # a replay writes nothing: not the token, not the audit trail

        # The same key with another body: 422, and nothing changes.
        other = api.post("/v1/resets", json={**body, "reason": "another reason"}, headers=key)
        problem = assert_problem(other, 422, "idempotency_key_reused")
        assert req["request_id"] in problem["detail"] and "other parameters" in problem["detail"]
        assert unchanged() == before

        # What is stored can confirm nothing: a digest of the key and the token sealed under it.
        job = stored_request(req["request_id"])
        assert job.idempotency_key_hash and key["Idempotency-Key"] not in (job.idempotency_key_hash,
                                                                            job.sealed_token)
        assert job.sealed_token and req["token"] not in job.sealed_token
        assert bytes.fromhex(job.sealed_token) != req["token"].encode()
        assert "idempotency_key" not in {c["name"] for c in inspect(get_engine()).get_columns("reset_jobs")}

        # The first token confirms; a replay then says so, without a token, and the token is used up.
        confirm = {"actor_id": a.admin_id, "token": req["token"]}
        confirmed = api.post(f"/v1/resets/{req['request_id']}/confirm", json=confirm)
        assert confirmed.status_code == 202, confirmed.text
        after = api.post("/v1/resets", json=body, headers=key)
        assert after.status_code == 201 and after.headers["idempotent-replayed"] == "true"
        assert (after.json()["request_id"], after.json()["state"], after.json()["token"]) == (
            req["request_id"], "queued", None)
        assert stored_request(req["request_id"]).sealed_token is None
        assert_problem(api.post(f"/v1/resets/{req['request_id']}/confirm", json=confirm), 409, "token_invalid")
    with session_scope() as session:
        requested = session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "reset.requested", AuditEvent.job_id == uuid.UUID(req["request_id"])))
    assert requested == 1
    assert_no_server_error(server)


def test_item5_request_still_in_progress_with_the_key_is_409(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    body = {"actor_id": a.admin_id, "course_id": a.course_ids[1]}
    key = {"Idempotency-Key": "b0d1e8f2-in-progress"}
    with server.client(a.key) as api:
        with session_scope() as session:
            # The first request with the key, not committed yet (as a slow first attempt would be).
            first = resets.request(session, a.admin_id, a.course_ids[1], idempotency_key=key["Idempotency-Key"])
            busy = assert_problem(api.post("/v1/resets", json=body, headers=key), 409, "conflict")
            assert "still in progress" in busy["detail"]
            assert api.post("/v1/resets", json=body, headers={"Idempotency-Key": "another-key"}).status_code == 201
        # Committed: the retry gets the first answer.
        again = api.post("/v1/resets", json=body, headers=key)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true", again.text
        assert (again.json()["request_id"], again.json()["token"]) == (first.request_id, first.token)
    assert_no_server_error(server)
