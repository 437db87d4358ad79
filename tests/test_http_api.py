"""The HTTP producer end to end: a real uvicorn server on loopback, a real HTTP client, real workers.

``progress-reset serve`` runs as a subprocess against a fresh PostgreSQL
database and the test Redis; requests go through httpx. The helpers here
(``start_api``, ``tenants``) are also used by ``tests/test_metrics.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select, update

from models.db import dispose_engine, session_scope
from models.schema import AuditEvent, CourseAssignment, ResetJob, User
from models.seed import seed
from models.times import utcnow
from producer import apikeys

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_READY_SECONDS = 20.0
PROBLEM_JSON = "application/problem+json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_argv(*args: str) -> list[str]:
    """``progress-reset <args>``: the installed console script, or the same entry point through -m."""
    script = Path(sys.executable).with_name("progress-reset")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "producer.cli", *args]


def run_cli(env: dict[str, str], *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@dataclass
class ApiServer:
    """A ``progress-reset serve`` subprocess on a free loopback port."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def client(self, key: str | None = None, header: str = "bearer") -> httpx.Client:
        headers = {}
        if key is not None:
            headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30.0)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self, event: str | None = None) -> list[dict]:
        found = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is None or record.get("event") == event:
                found.append(record)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture
def start_api(tmp_path: Path, request: pytest.FixtureRequest):
    """Factory: ``start_api(env)`` -> a ready :class:`ApiServer`; every server is stopped at teardown."""
    started: list[ApiServer] = []

    def start(env: dict[str, str]) -> ApiServer:
        port = free_port()
        log_path = tmp_path / f"api-{len(started)}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(cli_argv("serve", "--host", "127.0.0.1", "--port", str(port)),
                                       env={**env, "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        server = ApiServer(process, f"http://127.0.0.1:{port}", log_path)
        started.append(server)
        deadline = time.monotonic() + SERVER_READY_SECONDS
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the API server exited with {process.returncode}:\n{server.log_text()}")
            try:
                if httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the API server did not answer in {SERVER_READY_SECONDS:.0f}s:\n"
                                     f"{server.log_text()}")
            time.sleep(0.1)

    yield start
    for server in started:
        server.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for server in started:
            print(f"--- API server log {server.log_path} ---\n{server.log_text()[-6000:]}")


@pytest.fixture
def api_env(fresh_db, use_env, redis_url, tmp_path):
    """This process and its subprocesses on a fresh database and the test Redis (emptied first)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # messages an earlier test left for a database that no longer exists
    client.close()
    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url, LOG_FORMAT="json",
                  RESET_BATCH_SIZE="50", NOTIFY_BACKEND="console",
                  NOTIFY_CONSOLE_PATH=str(tmp_path / "notifications.jsonl"), NOTIFY_RATE_PER_SECOND="5000")
    yield env
    dispose_engine()


@dataclass
class Tenant:
    organization_id: int
    admin_id: int
    plain_id: int  # a user without either permission
    course_ids: list[int]
    key: str
    key_name: str
    key_prefix: str


@dataclass
class Tenants:
    a: Tenant
    b: Tenant


def make_tenant(learners: int, courses: int, key_name: str, random_seed: int) -> Tenant:
    with session_scope() as session:
        org = seed(session, learners=learners, lessons=4, courses=courses, completed_ratio=0.4,
                   in_progress_ratio=0.5, random_seed=random_seed)
        created = apikeys.create_api_key(session, org.organization_id, key_name)
    return Tenant(org.organization_id, org.admin_id, org.learner_id, org.course_ids, created.key, key_name,
                  created.prefix)


@pytest.fixture
def tenants(api_env) -> Tenants:
    """Two organizations, each with an admin, a user without permissions, courses and an API key."""
    return Tenants(a=make_tenant(120, 3, "lms-a", 5), b=make_tenant(40, 2, "lms-b", 6))


def wait_for_state(client: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"),
                   timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/resets/{job_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, f"job {job_id} still {body['state']} after {timeout:.0f}s: {body}"
        time.sleep(0.2)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    assert body["title"] and body["detail"] and body["type"].endswith(code)
    return body


def job_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(ResetJob))


# --- API keys (plain functions, rolled back) ------------------------------------------------------

def test_api_keys_are_stored_hashed_scoped_and_revocable(db_session):
    from models.errors import NotFound, Unauthenticated, ValidationFailed
    from models.schema import ApiKey
    from models.training import create_organization, create_user

    org = create_organization(db_session, "Keys org")
    other = create_organization(db_session, "Other org")
    member = create_user(db_session, org.id, "Member", "member@example.com")
    outsider = create_user(db_session, other.id, "Outsider", "outsider@example.com")
    created = apikeys.create_api_key(db_session, org.id, "lms")
    row = db_session.scalars(select(ApiKey).where(ApiKey.prefix == created.prefix)).one()
    assert created.key.startswith(created.prefix + ".") and row.key_hash == apikeys.hash_key(created.key)
    assert created.key not in (row.key_hash, row.prefix, row.name)

    identity = apikeys.verify_api_key(db_session, created.key)
    assert (identity.organization_id, identity.origin) == (org.id, "http:lms")
    assert identity.require_actor(db_session, member.id).id == member.id
    for actor in (outsider.id, 999_999):
        with pytest.raises(NotFound):
            identity.require_actor(db_session, actor)
    for presented in (None, "", "garbage", created.prefix, created.key + "x", "prk_00000000." + "a" * 43,
                      created.prefix + ".wrong"):
        with pytest.raises(Unauthenticated):
            apikeys.verify_api_key(db_session, presented)
    for name in ("", "   ", "x" * 60, "tab\there"):
        with pytest.raises(ValidationFailed):
            apikeys.create_api_key(db_session, org.id, name)
    with pytest.raises(NotFound):
        apikeys.create_api_key(db_session, 999_999, "lms")

    revoked = apikeys.revoke_api_key(db_session, created.prefix)
    assert revoked["revoked_at"] and apikeys.revoke_api_key(db_session, created.prefix) == revoked  # twice is fine
    with pytest.raises(Unauthenticated):
        apikeys.verify_api_key(db_session, created.key)
    listed = apikeys.list_api_keys(db_session, org.id)
    assert [k["prefix"] for k in listed] == [created.prefix] and "key" not in listed[0]
    actions = set(db_session.scalars(select(AuditEvent.action).where(AuditEvent.organization_id == org.id)))
    assert {"api_key.created", "api_key.revoked"} <= actions


# --- the main flow -----------------------------------------------------------------------------

def test_request_confirm_status_flow_ends_succeeded_with_a_real_worker(api_env, tenants, start_api,
                                                                        celery_worker_proc):
    a = tenants.a
    celery_worker_proc(api_env, concurrency=2, name="api")
    server = start_api(api_env)
    course = a.course_ids[0]
    with server.client(a.key) as api:
        body = {"actor_id": a.admin_id, "course_id": course, "reason": "procedure changed"}
        first = api.post("/v1/resets", json=body, headers={"Idempotency-Key": "lms-a-42"})
        assert first.status_code == 201, first.text
        req = first.json()
        assert set(req) >= {"request_id", "token", "expires_at", "summary", "state"}
        assert set(req["summary"]) >= {"learners", "completions", "certificates", "learners_to_notify"}
        assert req["state"] == "awaiting_confirmation" and req["summary"]["learners"] > 0

        # Same key, same parameters: the same answer, token included, marked as a replay.
        again = api.post("/v1/resets", json=body, headers={"Idempotency-Key": "lms-a-42"})
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == {**req, "replayed": True} and req["replayed"] is False
        token = req["token"]

        confirmed = api.post(f"/v1/resets/{req['request_id']}/confirm",
                             json={"actor_id": a.admin_id, "token": token})
        assert confirmed.status_code == 202, confirmed.text
        assert confirmed.json() == {"job_id": req["request_id"], "state": "queued"}

        st = wait_for_state(api, req["request_id"])
        assert st["state"] == "succeeded", st
        assert st["learners_done"] == st["learners_total"] == req["summary"]["learners"]
        assert st["batches_done"] == st["batches_total"] >= 2  # 50 learners per batch
        assert st["cleared"]["course_completions"] == req["summary"]["completions"]
        assert st["cleared"]["certificates"] == req["summary"]["certificates"]
        assert set(st["notifications"]) == {"pending", "sent", "failed"}
        assert st["finished_at"] and st["error"] is None

        # One learner over the X-API-Key header: same service functions, same result shape.
    with server.client(a.key, header="x-api-key") as api:
        with session_scope() as session:
            learner = session.scalar(select(CourseAssignment.user_id).where(
                CourseAssignment.course_id == a.course_ids[1], CourseAssignment.status != "not_started")
                .order_by(CourseAssignment.user_id))
        one = api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": a.course_ids[1],
                                           "learner_id": learner})
        assert one.status_code == 201, one.text
        ok = api.post(f"/v1/resets/{one.json()['request_id']}/confirm",
                      json={"actor_id": a.admin_id, "token": one.json()["token"]})
        assert ok.status_code == 202, ok.text
        st = wait_for_state(api, one.json()["request_id"])
        assert st["state"] == "succeeded" and st["scope"] == "learner"

    # The audit trail says where the requests came from: the key's name, never the key.
    with session_scope() as session:
        origins = set(session.scalars(select(AuditEvent.origin).where(AuditEvent.job_id.is_not(None))))
        people = session.execute(select(User.name, User.email)).all()
    assert origins == {f"http:{a.key_name}"}

    # One JSON log line per request: method, path template, status, duration, key prefix; no names or e-mails.
    lines = server.log_events("http.request")
    routes = {(r["method"], r["route"], r["status"]) for r in lines}
    assert ("POST", "/v1/resets", 201) in routes
    assert ("POST", "/v1/resets/{request_id}/confirm", 202) in routes
    assert ("GET", "/v1/resets/{job_id}", 200) in routes
    assert all(r["key"] == a.key_prefix and r["duration_ms"] >= 0 for r in lines if r["route"].startswith("/v1"))
    text = server.log_text()
    assert req["request_id"] not in {r["route"] for r in lines}
    assert a.key not in text and token not in text
    for name, email in people:
        assert email not in text and f'"{name}"' not in text


# --- every error code -----------------------------------------------------------------------------

def test_every_error_code_is_produced_by_a_real_bad_request(api_env, tenants, start_api):
    a, b = tenants.a, tenants.b
    # A key that is revoked with the CLI is refused from the next request on.
    created = run_cli(api_env, "api-key", "create", "--organization", str(a.organization_id), "--name", "old-lms",
                      "--json")
    assert created.returncode == 0, created.stderr
    old = json.loads(created.stdout)
    server = start_api(api_env)
    with server.client(old["key"]) as api:
        assert api.get("/v1/resets/00000000-0000-0000-0000-000000000000").status_code == 404  # the key works
    revoked = run_cli(api_env, "api-key", "revoke", old["prefix"], "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_at"], revoked.stderr
    unknown_prefix = run_cli(api_env, "api-key", "revoke", "prk_00000000")
    assert unknown_prefix.returncode == 1 and "not found" in unknown_prefix.stderr
    listed = json.loads(run_cli(api_env, "api-key", "list", "--organization", str(a.organization_id),
                                "--json").stdout)["keys"]
    assert {k["prefix"]: bool(k["revoked_at"]) for k in listed} == {a.key_prefix: False, old["prefix"]: True}
    assert old["key"] not in json.dumps(listed)

    course, other_course, third_course = a.course_ids
    body = {"actor_id": a.admin_id, "course_id": course}
    jobs_before = job_count()
    with httpx.Client(base_url=server.base_url, timeout=30.0) as anonymous, \
            server.client(a.key) as api, server.client(old["key"]) as revoked_api, \
            server.client("prk_deadbeef.not-a-real-key") as wrong_api:
        # 401: no key, an unknown key, another scheme, a revoked key; checked before the body is read.
        assert_problem(anonymous.post("/v1/resets", json=body), 401, "unauthenticated")
        assert_problem(anonymous.post("/v1/resets", content=b"{not json", headers={"content-type": "application/json"}),
                       401, "unauthenticated")
        assert anonymous.post("/v1/resets", json=body).headers["www-authenticate"] == "Bearer"
        assert_problem(wrong_api.post("/v1/resets", json=body), 401, "unauthenticated")
        assert_problem(anonymous.get("/v1/resets/x", headers={"Authorization": f"Basic {a.key}"}), 401,
                       "unauthenticated")
        assert_problem(revoked_api.post("/v1/resets", json=body), 401, "unauthenticated")

        # 400: malformed JSON.
        assert_problem(api.post("/v1/resets", content=b'{"actor_id": 1,', headers={"content-type": "application/json"}),
                       400, "malformed_json")

        # 422: validation (missing, wrong type, unknown field, out of range, too long).
        assert_problem(api.post("/v1/resets", json={"actor_id": a.admin_id}), 422, "validation_failed")
        assert_problem(api.post("/v1/resets", json={**body, "actor_id": str(a.admin_id)}), 422, "validation_failed")
        assert_problem(api.post("/v1/resets", json={**body, "learners": "all"}), 422, "validation_failed")
        assert_problem(api.post("/v1/resets", json={**body, "course_id": -1}), 422, "validation_failed")
        assert_problem(api.post("/v1/resets", json={**body, "course_id": 2**40}), 422, "validation_failed")
        assert_problem(api.post("/v1/resets", json={**body, "reason": "x" * 2001}), 422, "validation_failed")
        assert_problem(api.post("/v1/resets", json=body, headers={"Idempotency-Key": "k" * 201}), 422,
                       "validation_failed")
        assert_problem(api.post("/v1/resets/x/confirm", json={"actor_id": a.admin_id}), 422, "validation_failed")
        detail = assert_problem(api.post("/v1/resets", json=[1, 2]), 422, "validation_failed")
        assert all(set(e) == {"loc", "msg", "type"} for e in detail["errors"])  # the input is never echoed

        # 403: the actor lacks the permission (a whole-course reset needs training.manage).
        assert_problem(api.post("/v1/resets", json={**body, "actor_id": a.plain_id}), 403, "permission_denied")

        # 404: unknown course, unknown actor, unknown job, another organization's actor.
        assert_problem(api.post("/v1/resets", json={**body, "course_id": 999_999}), 404, "not_found")
        assert_problem(api.post("/v1/resets", json={**body, "actor_id": 999_999}), 404, "not_found")
        assert_problem(api.post("/v1/resets", json={**body, "actor_id": b.admin_id}), 404, "not_found")
        assert_problem(api.get("/v1/resets/not-a-uuid"), 404, "not_found")
        assert_problem(api.get("/v1/resets/00000000-0000-0000-0000-000000000000"), 404, "not_found")
        assert_problem(api.get("/v1/nothing-here"), 404, "not_found")
        assert job_count() == jobs_before  # no refusal wrote anything

        # 422: idempotency key reused with other parameters.
        first = api.post("/v1/resets", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 201, first.text
        assert_problem(api.post("/v1/resets", json={**body, "reason": "other"}, headers={"Idempotency-Key": "k-1"}),
                       422, "idempotency_key_reused")

        # 409: wrong token (and nothing changes), then the right one; a reused token.
        req = first.json()
        assert_problem(api.post(f"/v1/resets/{req['request_id']}/confirm",
                                json={"actor_id": a.admin_id, "token": "wrong"}), 409, "token_invalid")
        assert api.get(f"/v1/resets/{req['request_id']}").json()["state"] == "awaiting_confirmation"
        confirm = {"actor_id": a.admin_id, "token": req["token"]}
        assert api.post(f"/v1/resets/{req['request_id']}/confirm", json=confirm).status_code == 202
        assert_problem(api.post(f"/v1/resets/{req['request_id']}/confirm", json=confirm), 409, "token_invalid")

        # 409: the course is already being reset (no worker runs here, so the job stays queued).
        busy = assert_problem(api.post("/v1/resets", json=body), 409, "conflict")
        assert req["request_id"] in busy["detail"]

        # 403: only the actor who made the request may confirm it.
        second = api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": other_course}).json()
        assert_problem(api.post(f"/v1/resets/{second['request_id']}/confirm",
                                json={"actor_id": a.plain_id, "token": second["token"]}), 403, "permission_denied")

        # 410: the token expired.
        with session_scope() as session:
            session.execute(update(ResetJob).where(ResetJob.id == uuid.UUID(second["request_id"]))
                            .values(token_expires_at=utcnow() - timedelta(seconds=1)))
        assert_problem(api.post(f"/v1/resets/{second['request_id']}/confirm",
                                json={"actor_id": a.admin_id, "token": second["token"]}), 410, "token_expired")
        assert api.get(f"/v1/resets/{second['request_id']}").json()["state"] == "awaiting_confirmation"

        # 409: cancelling what is not queued or running.
        assert_problem(api.post(f"/v1/resets/{second['request_id']}/cancel", json={"actor_id": a.admin_id}), 409,
                       "conflict")
        # Cancelling the queued job works and frees the course.
        cancelled = api.post(f"/v1/resets/{req['request_id']}/cancel", json={"actor_id": a.admin_id})
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text  # queued
        assert api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": third_course}).status_code == 201

        # Operations endpoints need no key.
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text

        # The served OpenAPI schema is the committed one.
        served = anonymous.get("/openapi.json")
        assert served.status_code == 200
        committed = json.loads((REPO_ROOT / "docs" / "openapi.json").read_text())
        assert served.json() == committed, "docs/openapi.json is stale: progress-reset openapi --output docs/openapi.json"

    statuses = {r["status"] for r in server.log_events("http.request")}
    assert {400, 401, 403, 404, 409, 410, 422} <= statuses


def test_openapi_command_matches_the_committed_schema(api_env):
    check = run_cli(api_env, "openapi", "--check")
    assert check.returncode == 0, check.stderr


def test_readyz_and_v1_answer_503_when_database_and_broker_are_down(fresh_db, use_env, start_api):
    url = fresh_db()
    env = use_env(DATABASE_URL=url.rsplit("/", 1)[0] + "/pr_no_such_database",
                  CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", REDIS_URL=None)
    server = start_api(env)
    with server.client("prk_00000000.whatever") as api:
        assert api.get("/healthz").status_code == 200  # the process is up
        body = assert_problem(api.get("/readyz"), 503, "unavailable")
        assert "database" in body["detail"] and "broker" in body["detail"]
        assert_problem(api.post("/v1/resets", json={"actor_id": 1, "course_id": 1}), 503, "unavailable")


# --- organizations never see each other -----------------------------------------------------------------

def test_a_key_of_organization_a_cannot_see_or_touch_organization_b(api_env, tenants, start_api):
    a, b = tenants.a, tenants.b
    server = start_api(api_env)
    with server.client(b.key) as as_b, server.client(a.key) as as_a:
        # Organization B's objects, made with B's key: an unconfirmed request, a queued job, a campaign.
        pending = as_b.post("/v1/resets", json={"actor_id": b.admin_id, "course_id": b.course_ids[1]}).json()
        queued_req = as_b.post("/v1/resets", json={"actor_id": b.admin_id, "course_id": b.course_ids[0]}).json()
        queued = as_b.post(f"/v1/resets/{queued_req['request_id']}/confirm",
                           json={"actor_id": b.admin_id, "token": queued_req["token"]})
        assert queued.status_code == 202, queued.text
        made = as_b.post("/v1/campaigns", json={"actor_id": b.admin_id, "course_id": b.course_ids[1],
                                                "cron": "0 3 1 * *", "time_zone": "UTC"})
        assert made.status_code == 201, made.text
        campaign = made.json()
        ok = as_b.post(f"/v1/campaigns/{campaign['campaign_id']}/confirm",
                       json={"actor_id": b.admin_id, "token": campaign["token"]})
        assert ok.status_code == 200 and ok.json()["state"] == "active", ok.text
        b_job, b_campaign = queued_req["request_id"], campaign["campaign_id"]

        # Organization A's own campaign, to see that listing works for A.
        mine = as_a.post("/v1/campaigns", json={"actor_id": a.admin_id, "course_id": a.course_ids[0],
                                                "every_months": 6, "start": "2099-01-01"}).json()

        def refused(response: httpx.Response) -> None:
            assert_problem(response, 404, "not_found")

        # Resets: B's actor, B's course, B's learner, B's request, B's job.
        refused(as_a.post("/v1/resets", json={"actor_id": b.admin_id, "course_id": b.course_ids[0]}))
        refused(as_a.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": b.course_ids[0]}))
        refused(as_a.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": a.course_ids[0],
                                              "learner_id": b.plain_id}))
        refused(as_a.post(f"/v1/resets/{pending['request_id']}/confirm",
                          json={"actor_id": a.admin_id, "token": pending["token"]}))
        refused(as_a.post(f"/v1/resets/{pending['request_id']}/confirm",
                          json={"actor_id": b.admin_id, "token": pending["token"]}))
        refused(as_a.get(f"/v1/resets/{b_job}"))
        refused(as_a.get(f"/v1/resets/{pending['request_id']}"))
        refused(as_a.post(f"/v1/resets/{b_job}/cancel", json={"actor_id": a.admin_id}))
        refused(as_a.post(f"/v1/resets/{b_job}/cancel", json={"actor_id": b.admin_id}))

        # Campaigns: create on B's course, list/get/confirm/pause/resume/delete B's campaign.
        refused(as_a.post("/v1/campaigns", json={"actor_id": a.admin_id, "course_id": b.course_ids[0],
                                                 "cron": "0 3 1 * *"}))
        refused(as_a.post("/v1/campaigns", json={"actor_id": b.admin_id, "course_id": b.course_ids[0],
                                                 "cron": "0 3 1 * *"}))
        listed = as_a.get("/v1/campaigns", params={"actor_id": a.admin_id})
        assert listed.status_code == 200, listed.text
        assert [c["campaign_id"] for c in listed.json()["campaigns"]] == [mine["campaign_id"]]
        refused(as_a.get("/v1/campaigns", params={"actor_id": b.admin_id}))
        refused(as_a.get("/v1/campaigns", params={"actor_id": a.admin_id, "course_id": b.course_ids[1]}))
        refused(as_a.get(f"/v1/campaigns/{b_campaign}", params={"actor_id": a.admin_id}))
        refused(as_a.post(f"/v1/campaigns/{b_campaign}/confirm", json={"actor_id": a.admin_id, "token": "t"}))
        refused(as_a.post(f"/v1/campaigns/{b_campaign}/pause", json={"actor_id": a.admin_id}))
        refused(as_a.post(f"/v1/campaigns/{b_campaign}/resume", json={"actor_id": a.admin_id}))
        refused(as_a.delete(f"/v1/campaigns/{b_campaign}", params={"actor_id": a.admin_id}))
        refused(as_a.post(f"/v1/campaigns/{b_campaign}/pause", json={"actor_id": b.admin_id}))

        # A foreign id reads exactly like an unknown one.
        unknown = as_a.get("/v1/resets/00000000-0000-0000-0000-000000000000").json()
        foreign = as_a.get(f"/v1/resets/{b_job}").json()
        assert {k: v for k, v in unknown.items() if k != "detail"} == {k: v for k, v in foreign.items()
                                                                       if k != "detail"}

        # Nothing of B's changed, and B still sees all of it.
        assert as_b.get(f"/v1/resets/{b_job}").json()["state"] == "queued"
        assert as_b.get(f"/v1/resets/{pending['request_id']}").json()["state"] == "awaiting_confirmation"
        mine_b = as_b.get(f"/v1/campaigns/{b_campaign}", params={"actor_id": b.admin_id})
        assert mine_b.status_code == 200 and mine_b.json()["state"] == "active", mine_b.text
        paused = as_b.post(f"/v1/campaigns/{b_campaign}/pause", json={"actor_id": b.admin_id})
        assert paused.status_code == 200 and paused.json()["state"] == "paused"
        resumed = as_b.post(f"/v1/campaigns/{b_campaign}/resume", json={"actor_id": b.admin_id})
        assert resumed.status_code == 200 and resumed.json()["state"] == "active"
        deleted = as_b.delete(f"/v1/campaigns/{b_campaign}", params={"actor_id": b.admin_id})
        assert deleted.status_code == 200 and deleted.json()["state"] == "deleted"
        cancelled = as_b.post(f"/v1/resets/{b_job}/cancel", json={"actor_id": b.admin_id})
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
