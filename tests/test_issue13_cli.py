"""Issue 13, CLI findings: tokens that start with "-", ids out of range, and (with the Python API) text
the database cannot store, far-future campaign starts, resets of nobody and what the summary says.

Real PostgreSQL through the real ``progress-reset`` CLI in a subprocess; every refusal is one
``error:`` line, a non-zero exit, and the database unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.db import dispose_engine, session_scope
from models.jobs import hash_token, new_token
from models.schema import ResetJob
from models.seed import seed
from tests.reset_checks import fingerprint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_refused(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tenant_env(fresh_db, use_env, redis_url):
    env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url)
    with session_scope() as session:
        tenant = seed(session, learners=10, lessons=2, courses=2, completed_ratio=0.5, random_seed=13)
    yield env, tenant
    dispose_engine()


def refused_unchanged(env, args, *needles):
    with session_scope() as session:
        before = fingerprint(session)
    line = assert_refused(cli(env, *args), *needles)
    with session_scope() as session:
        assert fingerprint(session) == before, f"refused {args} changed the database"
    return line


def test_item1_new_tokens_never_start_with_a_dash():
    tokens = [new_token()[0] for _ in range(5000)]  # about 78 would start with "-" before
    assert not [t for t in tokens if t.startswith("-")]
    assert all(len(t) == 32 for t in tokens)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_item1_token_starting_with_dash_confirms_through_the_cli(tenant_env, form):
    """A token issued before the rule (it starts with "-") still confirms, as ``--token -x`` or ``--token=-x``."""
    env, tenant = tenant_env
    out = cli(env, "request", "--actor", str(tenant.admin_id), "--course", str(tenant.course_ids[0]), "--json")
    assert out.returncode == 0, out.stderr
    request_id = json.loads(out.stdout)["request_id"]
    old_style = "-" + new_token()[0][1:]
    with session_scope() as session:
        session.get(ResetJob, __import__("uuid").UUID(request_id)).token_hash = hash_token(old_style)
    # A wrong token starting with "-" is read as a token, not an option, and refused as wrong.
    refused_unchanged(env, ["confirm", request_id, "--actor", str(tenant.admin_id), "--token", "-wrong"],
                      "wrong confirmation token")
    token_args = ["--token", old_style] if form == "separate" else [f"--token={old_style}"]
    ok = cli(env, "confirm", request_id, "--actor", str(tenant.admin_id), *token_args, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "queued"


def test_item1_missing_token_value_is_still_an_error(tenant_env):
    env, tenant = tenant_env
    proc = cli(env, "confirm", "00000000-0000-0000-0000-000000000000", "--actor", str(tenant.admin_id),
               "--token", "--json")
    assert_refused(proc, "--token", "expected one argument")


@pytest.mark.parametrize("args, option", [
    (["request", "--actor", "{admin}", "--course", "{course}", "--learner", "3000000000"], "--learner"),
    (["request", "--actor", "3000000000", "--course", "{course}"], "--actor"),
    (["request", "--actor", "{admin}", "--course", "2147483648"], "--course"),
    (["campaign", "pause", "3000000000", "--actor", "{admin}"], "campaign_id"),
    (["campaign", "confirm", "3000000000", "--actor", "{admin}", "--token", "x"], "campaign_id"),
    (["cancel", "00000000-0000-0000-0000-000000000000", "--actor", "3000000000"], "--actor"),
    (["api-key", "create", "--organization", "99999999999", "--name", "svc"], "--organization"),
])
def test_item6_cli_ids_out_of_range_are_refused_naming_the_option(tenant_env, args, option):
    env, tenant = tenant_env
    args = [a.format(admin=tenant.admin_id, course=tenant.course_ids[0]) for a in args]
    line = refused_unchanged(env, args, option, "at most 2147483647")
    assert "database" not in line


def test_item6_largest_id_is_accepted_and_simply_not_found(tenant_env):
    env, tenant = tenant_env
    refused_unchanged(env, ["request", "--actor", str(tenant.admin_id), "--course", "2147483647"],
                      "course 2147483647 not found")
