"""Issue 13, CLI findings: tokens that start with "-", ids out of range, and (with the Python API) text
the database cannot store, far-future campaign starts, resets of nobody and what the summary says.

Real PostgreSQL through the ``progress-reset`` CLI, run in this process (in a subprocess where the
bytes of the command line are the point); every refusal is one ``error:`` line, a non-zero exit, and
the database unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.db import dispose_engine, session_scope
from models.schema import ResetJob
from models.seed import seed
from models.tokens import hash_token, new_token
from tests.reset_checks import fingerprint
from tests.test_cli_foundation import invoke
from tests.test_producer_errors import refused

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_refused(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tenant(fresh_db, use_env, redis_url):
    """An organization in a fresh database this process (and a CLI it starts) points at."""
    use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url)
    with session_scope() as session:
        org = seed(session, learners=10, lessons=2, courses=2, completed_ratio=0.5, random_seed=13)
    yield org
    dispose_engine()


def refused_unchanged(args, *needles):
    with session_scope() as session:
        before = fingerprint(session)
    line = assert_refused(invoke(*args), *needles)
    with session_scope() as session:
        assert fingerprint(session) == before, f"refused {args} changed the database"
    return line


def test_item1_new_tokens_never_start_with_a_dash():
    tokens = [new_token()[0] for _ in range(5000)]  # about 78 would start with "-" before
    assert not [t for t in tokens if t.startswith("-")]
    assert all(len(t) == 32 for t in tokens)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_item1_token_starting_with_dash_confirms_through_the_cli(tenant, form):
    """A token issued before the rule (it starts with "-") still confirms, as ``--token -x`` or ``--token=-x``."""
    out = invoke("request", "--actor", str(tenant.admin_id), "--course", str(tenant.course_ids[0]), "--json")
    assert out.returncode == 0, out.stderr
    request_id = json.loads(out.stdout)["request_id"]
    old_style = "-" + new_token()[0][1:]
    with session_scope() as session:
        session.get(ResetJob, __import__("uuid").UUID(request_id)).token_hash = hash_token(old_style)
    # A wrong token starting with "-" is read as a token, not an option, and refused as wrong.
    refused_unchanged(["confirm", request_id, "--actor", str(tenant.admin_id), "--token", "-wrong"],
                      "wrong confirmation token")
    token_args = ["--token", old_style] if form == "separate" else [f"--token={old_style}"]
    ok = invoke("confirm", request_id, "--actor", str(tenant.admin_id), *token_args, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "queued"


def test_item1_missing_token_value_is_still_an_error(tenant):
    proc = invoke("confirm", "00000000-0000-0000-0000-000000000000", "--actor", str(tenant.admin_id),
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
def test_item6_cli_ids_out_of_range_are_refused_naming_the_option(tenant, args, option):
    args = [a.format(admin=tenant.admin_id, course=tenant.course_ids[0]) for a in args]
    line = refused_unchanged(args, option, "at most 2147483647")
    assert "database" not in line


def test_item6_largest_id_is_accepted_and_simply_not_found(tenant):
    refused_unchanged(["request", "--actor", str(tenant.admin_id), "--course", "2147483647"],
                      "course 2147483647 not found")


# --- item 4: text the database cannot store ------------------------------------------------

@pytest.fixture
def org(db_session):
    return seed(db_session, learners=12, lessons=2, courses=2, completed_ratio=0.5, random_seed=4)


def test_item4_nul_and_undecodable_text_is_refused_in_every_text_field(db_session, org):
    from models.errors import ValidationFailed
    from producer import apikeys, campaigns, resets

    course = org.course_ids[0]
    for bad in ("a\x00b", "caf\udce9"):
        refused(db_session, ValidationFailed, resets.request, org.admin_id, course, reason=bad, match="reason contains")
        refused(db_session, ValidationFailed, resets.request, org.admin_id, course, idempotency_key=bad,
                match="idempotency key contains")
        refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, cron="0 9 * * *",
                reason=bad, match="reason contains")
        refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, cron=bad,
                match="cron contains")
        refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, every_months=1,
                start=bad, match="start contains")
        refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, cron="0 9 * * *",
                time_zone=bad, match="time zone contains")
        refused(db_session, ValidationFailed, apikeys.create_api_key, org.organization_id, bad, match="name")
        refused(db_session, ValidationFailed, apikeys.revoke_api_key, bad, match="prefix contains")
    req = resets.request(db_session, org.admin_id, course)
    refused(db_session, ValidationFailed, resets.confirm, req.request_id, org.admin_id, "x\udcff",
            match="token contains an unpaired surrogate")
    assert ValidationFailed.http_status == 422
    refused(db_session, ValidationFailed, resets.request, org.admin_id, course, learner_id=org.learner_id,
            reason="a\x00b", match="the NUL character")


def test_item4_cli_reason_that_is_not_utf8_is_one_error_line(tenant):
    with session_scope() as session:
        before = fingerprint(session)
    argv = [sys.executable.encode(), b"-m", b"producer.cli", b"request", b"--actor", str(tenant.admin_id).encode(),
            b"--course", str(tenant.course_ids[0]).encode(), b"--reason", b"caf\xe9"]
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert_refused(proc, "reason contains an unpaired surrogate")
    with session_scope() as session:
        assert fingerprint(session) == before


# --- item 5: a far-future campaign start ----------------------------------------------------

@pytest.mark.parametrize("start, zone, needle", [
    ("9999-12-31T23:59", "UTC", "years ahead"),
    ("9999-12-31T23:59", "America/New_York", "out of range"),
    ("9999-12-31", "Pacific/Kiritimati", "years ahead"),
    ("2200-01-01", "UTC", "more than 100 years ahead"),
])
def test_item5_far_future_campaign_start_is_refused(db_session, org, start, zone, needle):
    from models.errors import ValidationFailed
    from producer import campaigns

    refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, org.course_ids[0],
            every_months=1, start=start, time_zone=zone, match=needle)


def test_item5_far_future_campaign_start_through_the_cli(tenant):
    for zone in ("UTC", "America/New_York"):
        refused_unchanged(["campaign", "create", "--actor", str(tenant.admin_id), "--course",
                                str(tenant.course_ids[0]), "--every-months", "1", "--start", "9999-12-31T23:59",
                                "--time-zone", zone], "start")
    refused_unchanged(["campaign", "run-due", "--at", "9999-12-31T23:59-05:00"], "--at", "out of range")


# --- item 9: what an admin sees -------------------------------------------------------------

def test_item9_reset_that_would_reset_nobody_is_refused(db_session, org):
    from models.errors import NothingToReset
    from models.training import assign_course, create_user
    from producer import resets

    newcomer = create_user(db_session, org.organization_id, "Nia Newcomer", "nia@example.com")
    assign_course(db_session, org.course_ids[0], newcomer.id)
    message = refused(db_session, NothingToReset, resets.request, org.admin_id, org.course_ids[0],
                      learner_id=newcomer.id, match="nothing to reset: learner")
    assert "Nia Newcomer" in message
    assert (NothingToReset.http_status, NothingToReset.code) == (422, "nothing_to_reset")
    from models.training import create_course

    empty = create_course(db_session, org.organization_id, "Forklift basics", [("lesson", "Intro")])
    assign_course(db_session, empty.id, newcomer.id)
    refused(db_session, NothingToReset, resets.request, org.admin_id, empty.id,
            match=f"nothing to reset: no learner assigned to course {empty.id} ('Forklift basics') has progress")


def test_item9_summary_names_the_course_and_learner_and_says_what_stays(tenant):
    course = str(tenant.course_ids[0])
    one = invoke("request", "--actor", str(tenant.admin_id), "--course", course, "--learner",
              str(tenant.learner_id), "--json")
    assert one.returncode == 0, one.stderr
    summary = json.loads(one.stdout)["summary"]
    assert {"learners", "completions", "certificates", "learners_to_notify"} <= set(summary)
    with session_scope() as session:
        from models.schema import Course, User

        title = session.get(Course, tenant.course_ids[0]).title
        name = session.get(User, tenant.learner_id).name
    assert (summary["learners"], summary["course_title"], summary["learner_name"]) == (1, title, name)
    assert summary["assigned_learners"] == 10 and summary["learners_keeping_state"] == 9
    assert summary["irreversible"] is True

    human = invoke("request", "--actor", str(tenant.admin_id), "--course", str(tenant.course_ids[1]),
                "--learner", str(tenant.learner_id))
    assert human.returncode == 0, human.stderr
    text = human.stdout
    assert f"'{title.replace('1', '2')}'" in text and name in text, text
    assert "1 completion " in text and "1 certificate " in text and "1 learners" not in text, text
    assert "9 assigned learners keep their state" in text and "cannot be undone" in text, text

    course_wide = invoke("request", "--actor", str(tenant.admin_id), "--course", course)
    assert course_wide.returncode == 0, course_wide.stderr
    assert "for 10 learners" in course_wide.stdout and "0 assigned learners keep their state" in course_wide.stdout


def test_item9_course_wide_summary_counts_who_keeps_their_state(db_session, org):
    from producer import resets

    req = resets.request(db_session, org.admin_id, org.course_ids[0])
    s = req.summary
    assert s["learner_name"] is None and s["assigned_learners"] == 12
    assert s["learners"] + s["learners_keeping_state"] == 12
    assert f"for {s['learners']} learners" in s["description"] and "cannot be undone" in s["description"]


def test_item9_campaign_more_often_than_once_a_day_is_refused(db_session, org, use_env):
    from models.errors import ValidationFailed
    from producer import campaigns

    course = org.course_ids[0]
    for cron, gap in (("* * * * *", "1 minute"), ("0 */6 * * *", "6 hours"), ("0 8,20 1 * *", "12 hours")):
        refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, cron=cron,
                match=f"occurrences would be {gap} apart")
    refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, cron="* * * * *",
            match="at most once every 1 day (CAMPAIGN_MIN_INTERVAL_SECONDS)")
    # Daily is fine, also across a daylight-saving change (a 23-hour day in UTC).
    campaigns.request_campaign(db_session, org.admin_id, course, cron="30 2 * * *", time_zone="Europe/Berlin")
    campaigns.request_campaign(db_session, org.admin_id, course, cron="0 9 * * 1-5", time_zone="UTC")
    use_env(CAMPAIGN_MIN_INTERVAL_SECONDS="3600")
    campaigns.request_campaign(db_session, org.admin_id, course, cron="0 * * * *")
    refused(db_session, ValidationFailed, campaigns.request_campaign, org.admin_id, course, cron="*/30 * * * *",
            match="at most once every 1 hour")
