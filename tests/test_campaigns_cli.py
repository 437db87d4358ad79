"""``progress-reset campaign ...`` with ``--json``, run in this process on a fresh database and the embedded broker."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from models.db import make_engine
from models.seed import seed
from tests.test_cli_foundation import invoke, table_counts


@pytest.fixture
def env(fresh_db, use_env, tmp_path) -> dict[str, str]:
    """A fresh migrated database, the embedded filesystem broker under the test's data folder."""
    return use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=None, REDIS_URL=None,
                   PROGRESS_RESET_DATA_DIR=str(tmp_path / "data"))


def ok(*args: str) -> dict:
    run = invoke(*args, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def seeded_in_process(url: str, learners: int = 5) -> dict:
    """Seed directly, without the CLI, for tests about other commands."""
    engine = make_engine(url)
    try:
        with Session(engine) as session, session.begin():
            return seed(session, learners=learners, random_seed=5).as_json()
    finally:
        engine.dispose()


def refused(*args: str) -> str:
    run = invoke(*args)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def test_campaign_lifecycle_through_the_cli(env):
    seeded = ok("seed", "--learners", "30", "--completed-ratio", "0.8", "--random-seed", "3")
    admin, course = str(seeded["admin_id"]), str(seeded["course_ids"][0])

    created = ok("campaign", "create", "--actor", admin, "--course", course, "--cron", "30 2 * * *",
                 "--time-zone", "Europe/Berlin", "--completed-before-days", "30", "--reason", "annual refresher")
    assert created["state"] == "awaiting_confirmation" and created["token"]
    assert created["schedule"] == "cron '30 2 * * *' in Europe/Berlin"
    assert set(created["summary"]) == {"learners", "completions", "certificates", "learners_to_notify"}
    assert created["summary"]["learners"] > 0
    campaign = str(created["campaign_id"])

    confirmed = ok("campaign", "confirm", campaign, "--actor", admin, "--token", created["token"])
    assert confirmed["state"] == "active"
    assert confirmed["next_occurrence_at"] == created["first_occurrences"][0]
    assert confirmed["next_occurrence_local"].endswith(("T02:30:00+01:00", "T02:30:00+02:00", "T03:00:00+02:00"))
    assert "already confirmed" in refused(
        "campaign", "confirm", campaign, "--actor", admin, "--token", created["token"])

    listed = ok("campaign", "list", "--actor", admin)["campaigns"]
    assert [(c["campaign_id"], c["state"], c["audience_days"]) for c in listed] == [(int(campaign), "active", 30)]

    due = datetime.fromisoformat(confirmed["next_occurrence_at"])
    at = (due + timedelta(seconds=30)).isoformat()
    assert ok("campaign", "run-due", "--at", (due - timedelta(seconds=1)).isoformat())["due"] == 0
    dispatched = ok("campaign", "run-due", "--at", at)
    assert (dispatched["due"], dispatched["queued"], dispatched["missed"]) == (1, 1, 0)
    [job_id] = dispatched["job_ids"]
    assert dispatched["occurrences"][0]["occurrence_at"] == due.isoformat()
    assert ok("campaign", "run-due", "--at", at)["due"] == 0  # the same tick again: nothing
    status = ok("status", job_id)
    assert (status["state"], status["campaign_id"], status["scope"]) == ("queued", int(campaign), "course")
    # resets.start went to the (embedded) broker after the commit, with the job id only.
    broker = Path(env["PROGRESS_RESET_DATA_DIR"]) / "broker" / "out"
    assert any(job_id in f.read_text() for f in broker.iterdir())

    paused = ok("campaign", "pause", campaign, "--actor", admin)
    assert (paused["state"], paused["next_occurrence_at"]) == ("paused", None)
    resumed = ok("campaign", "resume", campaign, "--actor", admin)
    assert resumed["state"] == "active" and resumed["next_occurrence_at"]
    assert resumed["last_occurrence"]["job_id"] == job_id and resumed["occurrences_done"] == 1
    deleted = ok("campaign", "delete", campaign, "--actor", admin)
    assert deleted["state"] == "deleted"
    assert ok("campaign", "list", "--actor", admin)["campaigns"] == []
    assert [c["state"] for c in ok("campaign", "list", "--actor", admin, "--all")["campaigns"]] == ["deleted"]


def test_campaign_months_schedule_through_the_cli(env):
    seeded = seeded_in_process(env["DATABASE_URL"])
    admin, course = str(seeded["admin_id"]), str(seeded["course_ids"][0])
    created = ok("campaign", "create", "--actor", admin, "--course", course, "--every-months", "12",
                 "--start", "2031-01-31T09:00", "--time-zone", "America/New_York")
    assert created["first_occurrences"] == [
        "2031-01-31T14:00:00+00:00", "2032-01-31T14:00:00+00:00", "2033-01-31T14:00:00+00:00"]


@pytest.mark.parametrize("args, message", [
    (["--cron", "61 * * * *"], "error: malformed cron expression '61 * * * *'"),
    (["--every-months", "0", "--start", "2031-01-01"], "error: the interval must be at least 1 month, got 0"),
    (["--cron", "0 9 * * *", "--time-zone", "Mars/Olympus"], "error: unknown time zone 'Mars/Olympus'"),
    (["--every-months", "12", "--start", "2020-01-01"], "more than 1 day in the past"),
    (["--cron", "0 9 * * *", "--completed-before-days", "0"], "completed-before days must be at least 1"),
])
def test_bad_campaign_input_is_one_line_non_zero_and_writes_nothing(env, args, message):
    seeded = seeded_in_process(env["DATABASE_URL"])
    before = table_counts(env["DATABASE_URL"])
    line = refused("campaign", "create", "--actor", str(seeded["admin_id"]), "--course",
                   str(seeded["course_ids"][0]), *args)
    assert message in line
    assert table_counts(env["DATABASE_URL"]) == before


def test_refusals_of_the_other_campaign_commands(env):
    seeded = seeded_in_process(env["DATABASE_URL"])
    admin, learner = str(seeded["admin_id"]), str(seeded["learner_id"])
    before = table_counts(env["DATABASE_URL"])
    assert "lacks the permission training.manage" in refused(
        "campaign", "create", "--actor", learner, "--course", str(seeded["course_ids"][0]), "--cron", "0 9 * * *")
    assert refused("campaign", "confirm", "424242", "--actor", admin, "--token", "x") == \
        "error: campaign 424242 not found"
    assert "expected an ISO-8601 date-time" in refused("campaign", "run-due", "--at", "next tuesday")
    assert table_counts(env["DATABASE_URL"]) == before
