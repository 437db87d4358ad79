"""Bad input through the Python API and the CLI: a clear one-line error, and the database unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from freezegun import freeze_time

from models.db import dispose_engine, session_scope
from models.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    PermissionDenied,
    TokenExpired,
    TokenInvalid,
    ValidationFailed,
)
from models.job_ids import job_uuid
from models.jobs import expire_requests
from models.schema import ResetJob
from models.seed import seed
from models.times import utcnow
from models.training import create_user
from producer import resets
from tasks.resets.finalize import finalize_job
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.start import start_job
from tests.reset_checks import fingerprint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two_orgs(db_session):
    a = seed(db_session, learners=20, lessons=3, courses=1, random_seed=1)
    b = seed(db_session, learners=20, lessons=3, courses=1, random_seed=2)
    return a, b


def refused(session, error_type, fn, *args, match: str | None = None, **kwargs):
    """Call ``fn`` the way ``session_scope`` would (rolled back on error); assert the refusal and no change."""
    before = fingerprint(session)
    with pytest.raises(error_type) as info:
        with session.begin_nested():
            fn(session, *args, **kwargs)
    assert fingerprint(session) == before, "a refused call changed the database"
    message = str(info.value)
    assert "\n" not in message and message
    if match:
        assert match in message, message
    return message


def test_unknown_and_foreign_objects_are_not_found(db_session, two_orgs):
    a, b = two_orgs
    refused(db_session, NotFound, resets.request, 999_999, a.course_ids[0], match="actor 999999")
    refused(db_session, NotFound, resets.request, a.admin_id, 999_999, match="course 999999")
    # Another organization's course or learner is refused as if it did not exist (R2).
    refused(db_session, NotFound, resets.request, a.admin_id, b.course_ids[0], match=f"course {b.course_ids[0]}")
    refused(db_session, NotFound, resets.request, a.admin_id, a.course_ids[0], learner_id=b.learner_id,
            match=f"learner {b.learner_id} not found")


def test_missing_permission_per_scope(db_session, two_orgs):
    a, _ = two_orgs
    course = a.course_ids[0]
    refused(db_session, PermissionDenied, resets.request, a.learner_id, course, match="training.manage")
    refused(db_session, PermissionDenied, resets.request, a.learner_id, course, learner_id=a.learner_id,
            match="platform.users")
    users_only = create_user(db_session, a.organization_id, "Support", "s@example.com", ("platform.users",))
    resets.request(db_session, users_only.id, course, learner_id=a.learner_id)  # allowed: one learner
    refused(db_session, PermissionDenied, resets.request, users_only.id, course, match="training.manage")


def test_learner_not_assigned(db_session, two_orgs):
    a, _ = two_orgs
    loner = create_user(db_session, a.organization_id, "New hire", "n@example.com")
    refused(db_session, NotFound, resets.request, a.admin_id, a.course_ids[0], learner_id=loner.id,
            match="not assigned")


def test_tokens_wrong_expired_reused_and_other_actor(db_session, two_orgs):
    a, _ = two_orgs
    course = a.course_ids[0]
    req = resets.request(db_session, a.admin_id, course)
    refused(db_session, TokenInvalid, resets.confirm, req.request_id, a.admin_id, "not-the-token",
            match="wrong confirmation token")
    other_admin = create_user(db_session, a.organization_id, "Admin 2", "a2@example.com",
                              ("platform.users", "training.manage"))
    refused(db_session, PermissionDenied, resets.confirm, req.request_id, other_admin.id, req.token,
            match="only they can confirm")
    with freeze_time(utcnow() + timedelta(minutes=16)):
        refused(db_session, TokenExpired, resets.confirm, req.request_id, a.admin_id, req.token, match="expired")
    resets.confirm(db_session, req.request_id, a.admin_id, req.token)
    refused(db_session, TokenInvalid, resets.confirm, req.request_id, a.admin_id, req.token,
            match="already confirmed")
    refused(db_session, NotFound, resets.confirm, "not-a-uuid", a.admin_id, req.token)


def test_idempotency_key(db_session, two_orgs):
    a, _ = two_orgs
    course = a.course_ids[0]
    first = resets.request(db_session, a.admin_id, course, reason="x", idempotency_key="k-1")
    again = resets.request(db_session, a.admin_id, course, reason="x", idempotency_key="k-1")
    # The same answer, token included, marked as a replay.
    assert (again.request_id, again.token, again.expires_at) == (first.request_id, first.token, first.expires_at)
    assert again.replayed and not first.replayed
    refused(db_session, IdempotencyKeyReused, resets.request, a.admin_id, course, reason="other",
            idempotency_key="k-1", match="other parameters")
    refused(db_session, ValidationFailed, resets.request, a.admin_id, course, idempotency_key="k" * 201)
    refused(db_session, ValidationFailed, resets.request, a.admin_id, course, reason="r" * 2001)


def test_cancel_of_a_finished_job_is_refused(db_session, two_orgs):
    a, _ = two_orgs
    req = resets.request(db_session, a.admin_id, a.course_ids[0], learner_id=a.learner_id)
    job_id = resets.confirm(db_session, req.request_id, a.admin_id, req.token).job_id
    start = start_job(db_session, job_id, 100)
    claim_batch(db_session, job_id, start.batch_nos[0], 5, 60)
    reset_batch(db_session, job_id, start.batch_nos[0])
    finalize_job(db_session, job_id)
    refused(db_session, Conflict, resets.cancel, job_id, a.admin_id, match="succeeded")
    refused(db_session, PermissionDenied, resets.cancel, job_id, a.learner_id)


# --- the CLI -----------------------------------------------------------------------------

def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_refused(proc, needle):
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in lines[0], lines[0]


def test_cli_refusals_are_one_line_and_change_nothing(fresh_db, use_env, redis_url):
    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url)
    with session_scope() as session:
        a = seed(session, learners=10, lessons=2, courses=1, random_seed=5)
        b = seed(session, learners=10, lessons=2, courses=1, random_seed=6)
    course = str(a.course_ids[0])
    out = cli(env, "request", "--actor", str(a.admin_id), "--course", course, "--json")
    assert out.returncode == 0, out.stderr
    req = json.loads(out.stdout)
    assert set(req) >= {"request_id", "token", "expires_at", "summary"}
    assert set(req["summary"]) >= {"learners", "completions", "certificates", "learners_to_notify"}

    def unchanged(*args, needle):
        with session_scope() as session:
            before = fingerprint(session)
        assert_refused(cli(env, *args), needle)
        with session_scope() as session:
            assert fingerprint(session) == before

    unchanged("request", "--actor", str(a.admin_id), "--course", "424242", needle="course 424242 not found")
    unchanged("request", "--actor", str(a.admin_id), "--course", str(b.course_ids[0]), needle="not found")
    unchanged("request", "--actor", str(a.learner_id), "--course", course, needle="training.manage")
    unchanged("request", "--actor", "abc", "--course", course, needle="numeric id")
    unchanged("request", "--actor", "-3", "--course", course, needle="positive")
    unchanged("confirm", req["request_id"], "--actor", str(a.admin_id), "--token", "nope", needle="wrong")
    unchanged("confirm", req["request_id"], "--actor", str(b.admin_id), "--token", req["token"], needle="not found")
    unchanged("status", "00000000-0000-0000-0000-000000000000", needle="not found")
    unchanged("cancel", req["request_id"], "--actor", str(a.admin_id), needle="awaiting_confirmation")
    ok = cli(env, "confirm", req["request_id"], "--actor", str(a.admin_id), "--token", req["token"], "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "queued"
    unchanged("confirm", req["request_id"], "--actor", str(a.admin_id), "--token", req["token"],
              needle="already confirmed")
    unchanged("request", "--actor", str(a.admin_id), "--course", course, needle="already being reset")
    st = cli(env, "status", json.loads(ok.stdout)["job_id"], "--json")
    assert json.loads(st.stdout)["state"] in {"queued", "running", "succeeded"}
    bad_db = {**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    assert_refused(cli(bad_db, "status", json.loads(ok.stdout)["job_id"]), "database unavailable")
    dispose_engine()


def test_an_expired_request_keeps_nothing_that_opens_its_token(db_session, two_orgs):
    a, _b = two_orgs
    req = resets.request(db_session, a.admin_id, a.course_ids[0], idempotency_key="retry-7f3c2a")
    job = db_session.get(ResetJob, job_uuid(req.request_id))
    assert job.sealed_token is not None and job.token_hash is not None
    assert expire_requests(db_session, utcnow()) == 0  # still within its lifetime
    assert expire_requests(db_session, utcnow() + timedelta(hours=1)) == 1
    db_session.refresh(job)
    assert (job.state, job.token_hash, job.sealed_token) == ("expired", None, None)
