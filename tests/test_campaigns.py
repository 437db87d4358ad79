"""Retraining campaigns: the producer's service functions and the dispatcher's plain function.

Real PostgreSQL, each test rolled back. Bad input is refused with a clear
error and nothing written (rows counted before and after).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from models.errors import Conflict, NotFound, PermissionDenied, TokenExpired, TokenInvalid, ValidationFailed
from models.jobs import summarize
from models.schema import AuditEvent, ResetJob, RetrainingCampaign, User
from producer import campaigns, resets
from models.campaign_dispatch import dispatch_due
from tests.test_campaigns_support import (
    add_learner,
    campaign_jobs,
    confirmed_campaign,
    make_org,
    occurrence_rows,
    row_counts,
)

UTC = timezone.utc
NOW = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)  # a Monday


@pytest.fixture
def org(db_session):
    org = make_org(db_session, time_zone="Europe/Berlin")
    course = org.course_ids[0]
    add_learner(db_session, org, course, "old", completed_at=NOW - timedelta(days=400))
    add_learner(db_session, org, course, "recent", completed_at=NOW - timedelta(days=10))
    add_learner(db_session, org, course, "started", started_at=NOW - timedelta(days=3))
    add_learner(db_session, org, course, "untouched")
    return org


@pytest.fixture
def other_org(db_session):
    return make_org(db_session, time_zone="UTC", name="Other")


def audit_actions(session, campaign_id):
    return session.scalars(select(AuditEvent.action).where(AuditEvent.campaign_id == campaign_id)
                           .order_by(AuditEvent.id)).all()


# --- request and confirm -------------------------------------------------------------------

def test_request_returns_token_summary_and_first_occurrences_in_the_org_time_zone(db_session, org):
    course = org.course_ids[0]
    req = campaigns.request_campaign(db_session, org.admin_id, course, cron="30 2 * * *", reason="refresher", now=NOW)
    assert req.token and req.expires_at == NOW + timedelta(minutes=15)
    assert req.time_zone == "Europe/Berlin"
    assert req.schedule == "cron '30 2 * * *' in Europe/Berlin"
    # 02:30 CET = 01:30 UTC, from the next day on.
    assert req.first_occurrences == [datetime(2025, 3, d, 1, 30, tzinfo=UTC) for d in (4, 5, 6)]
    assert req.summary == summarize(db_session, course) == {
        "learners": 3, "completions": 2, "certificates": 2, "learners_to_notify": 3}
    campaign = db_session.get(RetrainingCampaign, req.campaign_id)
    assert campaign.state == "awaiting_confirmation" and campaign.next_occurrence_at is None
    assert campaign.token_hash and req.token not in campaign.token_hash  # only the hash is stored
    assert audit_actions(db_session, req.campaign_id) == ["campaign.requested"]
    json = req.as_json()
    assert json["campaign_id"] == req.campaign_id and json["summary"]["learners"] == 3


def test_request_summary_with_completed_before_days_counts_only_older_completions(db_session, org):
    req = campaigns.request_campaign(db_session, org.admin_id, org.course_ids[0], cron="0 9 1 * *",
                                     completed_before_days=30, now=NOW)
    assert req.summary == {"learners": 1, "completions": 1, "certificates": 1, "learners_to_notify": 1}


def test_confirm_activates_and_stores_the_first_occurrence_in_utc(db_session, org):
    course = org.course_ids[0]
    req = campaigns.request_campaign(db_session, org.admin_id, course, every_months=12, start="2025-03-31T09:00",
                                     completed_before_days=365, now=NOW)
    view = campaigns.confirm_campaign(db_session, org.admin_id, req.campaign_id, req.token,
                                      now=NOW + timedelta(minutes=5))
    assert view["state"] == "active"
    # 09:00 CEST on 31 March = 07:00 UTC.
    assert view["next_occurrence_at"] == "2025-03-31T07:00:00+00:00"
    assert view["next_occurrence_local"] == "2025-03-31T09:00:00+02:00"
    assert view["audience"] == "completed_before_days" and view["audience_days"] == 365
    campaign = db_session.get(RetrainingCampaign, req.campaign_id)
    assert campaign.token_hash is None and campaign.confirmed_at is not None
    assert audit_actions(db_session, req.campaign_id) == ["campaign.requested", "campaign.confirmed"]


def test_months_start_of_today_runs_on_the_next_tick(db_session, org):
    campaign_id = confirmed_campaign(db_session, org, org.course_ids[0], NOW, every_months=6,
                                     start=NOW.astimezone(ZoneInfo("Europe/Berlin")).date())
    start = datetime(2025, 3, 2, 23, 0, tzinfo=UTC)  # local midnight of 3 March
    campaign = db_session.get(RetrainingCampaign, campaign_id)
    assert campaign.next_occurrence_at == start
    result = dispatch_due(db_session, NOW + timedelta(minutes=1))
    assert [(o.campaign_id, o.occurrence_at, o.outcome) for o in result.outcomes] == [(campaign_id, start, "queued")]


# --- bad input: a clear error, nothing written ------------------------------------------------

BAD_REQUESTS = [
    ("unknown course", dict(course_id=999_999), NotFound, "course 999999 not found"),
    ("foreign course", dict(course_id="other"), NotFound, "not found"),
    ("missing permission", dict(actor="plain"), PermissionDenied, "lacks the permission training.manage"),
    ("unknown actor", dict(actor=888_888), NotFound, "actor 888888 not found"),
    ("malformed cron", dict(cron="61 * * * *"), ValidationFailed, "malformed cron expression '61 \\* \\* \\* \\*'"),
    ("cron with four fields", dict(cron="0 9 * *"), ValidationFailed, "4 fields, expected five"),
    ("cron that never fires", dict(cron="0 9 30 2 *"), ValidationFailed, "never matches a date"),
    ("zero interval", dict(cron=None, every_months=0, start="2025-04-01"), ValidationFailed, "at least 1 month"),
    ("negative interval", dict(cron=None, every_months=-6, start="2025-04-01"), ValidationFailed,
     "at least 1 month"),
    ("unknown time zone", dict(time_zone="Europe/Atlantis"), ValidationFailed, "unknown time zone 'Europe/Atlantis'"),
    ("start beyond the bound", dict(cron=None, every_months=12, start="2025-03-01"), ValidationFailed,
     "more than 1 day in the past"),
    ("malformed start", dict(cron=None, every_months=12, start="03/04/2025"), ValidationFailed, "not an ISO-8601"),
    ("months without start", dict(cron=None, every_months=12), ValidationFailed, "needs a start date"),
    ("start with cron", dict(start="2025-04-01"), ValidationFailed, "applies to a months schedule only"),
    ("two schedules", dict(every_months=3), ValidationFailed, "exactly one schedule"),
    ("no schedule", dict(cron=None), ValidationFailed, "exactly one schedule"),
    ("zero audience days", dict(completed_before_days=0), ValidationFailed, "at least 1"),
    ("negative audience days", dict(completed_before_days=-30), ValidationFailed, "at least 1"),
    ("reason too long", dict(reason="x" * 2001), ValidationFailed, "at most 2000"),
]


@pytest.mark.parametrize("case, changes, error, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_and_writes_nothing(db_session, org, other_org, case, changes, error, message):
    args = dict(actor=org.admin_id, course_id=org.course_ids[0], cron="0 9 * * 1")
    args.update(changes)
    if args["actor"] == "plain":
        args["actor"] = org.plain_user_id
    if args["course_id"] == "other":
        args["course_id"] = other_org.course_ids[0]
    actor, course_id = args.pop("actor"), args.pop("course_id")
    before = row_counts(db_session)
    with pytest.raises(error, match=message):
        campaigns.request_campaign(db_session, actor, course_id, now=NOW, **args)
    db_session.flush()
    assert row_counts(db_session) == before


def test_admin_of_another_organization_sees_nothing(db_session, org, other_org):
    req = campaigns.request_campaign(db_session, org.admin_id, org.course_ids[0], cron="0 9 * * 1", now=NOW)
    before = row_counts(db_session)
    for call in (
        lambda: campaigns.confirm_campaign(db_session, other_org.admin_id, req.campaign_id, req.token, now=NOW),
        lambda: campaigns.pause_campaign(db_session, other_org.admin_id, req.campaign_id, now=NOW),
        lambda: campaigns.resume_campaign(db_session, other_org.admin_id, req.campaign_id, now=NOW),
        lambda: campaigns.delete_campaign(db_session, other_org.admin_id, req.campaign_id, now=NOW),
    ):
        with pytest.raises(NotFound, match=f"campaign {req.campaign_id} not found"):
            call()
    assert campaigns.list_campaigns(db_session, other_org.admin_id, now=NOW) == []
    with pytest.raises(NotFound):
        campaigns.list_campaigns(db_session, other_org.admin_id, course_id=org.course_ids[0], now=NOW)
    assert row_counts(db_session) == before
    assert db_session.get(RetrainingCampaign, req.campaign_id).state == "awaiting_confirmation"


def _token_case(db_session, org, case):
    req = campaigns.request_campaign(db_session, org.admin_id, org.course_ids[0], cron="0 9 * * 1", now=NOW)
    actor, token, at = org.admin_id, req.token, NOW + timedelta(minutes=1)
    if case == "wrong token":
        token = "not-the-token"
    elif case == "expired token":
        at = NOW + timedelta(minutes=15)
    elif case == "reused token":
        campaigns.confirm_campaign(db_session, actor, req.campaign_id, token, now=at)
    elif case == "another admin":
        other = User(organization_id=org.organization_id, name="Other admin", email="o@example.com",
                               permissions="training.manage", created_at=NOW)
        db_session.add(other)
        db_session.flush()
        actor = other.id
    elif case == "permission revoked":
        db_session.execute(update(User).where(User.id == actor).values(permissions="platform.users"))
    return req.campaign_id, actor, token, at


@pytest.mark.parametrize("case, error, message", [
    ("wrong token", TokenInvalid, "wrong confirmation token"),
    ("expired token", TokenExpired, "expired at"),
    ("reused token", TokenInvalid, "already confirmed"),
    ("another admin", PermissionDenied, "only they can confirm it"),
    ("permission revoked", PermissionDenied, "lacks the permission"),
])
def test_bad_confirmation_changes_nothing(db_session, org, case, error, message):
    campaign_id, actor, token, at = _token_case(db_session, org, case)
    db_session.flush()
    state = db_session.get(RetrainingCampaign, campaign_id).state
    before = row_counts(db_session)
    with pytest.raises(error, match=message):
        campaigns.confirm_campaign(db_session, actor, campaign_id, token, now=at)
    db_session.flush()
    assert row_counts(db_session) == before
    assert db_session.get(RetrainingCampaign, campaign_id).state == state


def test_unconfirmed_campaign_is_listed_as_expired_and_never_dispatched(db_session, org):
    req = campaigns.request_campaign(db_session, org.admin_id, org.course_ids[0], cron="0 9 * * *", now=NOW)
    [view] = campaigns.list_campaigns(db_session, org.admin_id, now=NOW + timedelta(hours=1))
    assert (view["campaign_id"], view["state"]) == (req.campaign_id, "expired")
    assert dispatch_due(db_session, NOW + timedelta(days=1)).outcomes == []


# --- list, pause, resume, delete -----------------------------------------------------------

def test_pause_resume_delete_and_list(db_session, org):
    course = org.course_ids[0]
    campaign_id = confirmed_campaign(db_session, org, course, NOW, cron="0 9 * * *", time_zone="UTC")
    paused = campaigns.pause_campaign(db_session, org.admin_id, campaign_id, now=NOW)
    assert (paused["state"], paused["changed"], paused["next_occurrence_at"]) == ("paused", True, None)
    assert campaigns.pause_campaign(db_session, org.admin_id, campaign_id, now=NOW)["changed"] is False

    # Paused over three occurrences: none runs and none is recorded as missed.
    later = NOW + timedelta(days=3)
    assert dispatch_due(db_session, later).outcomes == []
    resumed = campaigns.resume_campaign(db_session, org.admin_id, campaign_id, now=later)
    assert resumed["state"] == "active"
    assert resumed["next_occurrence_at"] == "2025-03-07T09:00:00+00:00"
    assert campaigns.resume_campaign(db_session, org.admin_id, campaign_id, now=later)["changed"] is False
    assert occurrence_rows(db_session, campaign_id) == []

    result = dispatch_due(db_session, datetime(2025, 3, 7, 9, 0, 30, tzinfo=UTC))
    assert [o.outcome for o in result.outcomes] == ["queued"]
    [view] = campaigns.list_campaigns(db_session, org.admin_id, course_id=course, now=later)
    assert view["occurrences_done"] == 1 and view["last_occurrence"]["outcome"] == "queued"
    assert view["last_occurrence"]["job_id"] == result.job_ids[0]

    deleted = campaigns.delete_campaign(db_session, org.admin_id, campaign_id, now=later)
    assert deleted["state"] == "deleted" and deleted["next_occurrence_at"] is None
    assert campaigns.list_campaigns(db_session, org.admin_id, now=later) == []
    assert [v["state"] for v in campaigns.list_campaigns(db_session, org.admin_id, include_deleted=True,
                                                         now=later)] == ["deleted"]
    with pytest.raises(NotFound):
        campaigns.resume_campaign(db_session, org.admin_id, campaign_id, now=later)
    assert dispatch_due(db_session, later + timedelta(days=30)).outcomes == []
    # The job an earlier occurrence queued is not cancelled by the delete.
    assert db_session.get(ResetJob, result.outcomes[0].job_id).state == "queued"
    assert audit_actions(db_session, campaign_id) == [
        "campaign.requested", "campaign.confirmed", "campaign.paused", "campaign.resumed",
        "campaign.occurrence_queued", "campaign.deleted"]


def test_pause_or_resume_in_the_wrong_state_is_a_conflict(db_session, org):
    req = campaigns.request_campaign(db_session, org.admin_id, org.course_ids[0], cron="0 9 * * *", now=NOW)
    with pytest.raises(Conflict, match="only an active campaign can be paused"):
        campaigns.pause_campaign(db_session, org.admin_id, req.campaign_id, now=NOW)
    with pytest.raises(Conflict, match="only a paused campaign can be resumed"):
        campaigns.resume_campaign(db_session, org.admin_id, req.campaign_id, now=NOW)


def test_list_pause_resume_delete_need_training_manage(db_session, org):
    campaign_id = confirmed_campaign(db_session, org, org.course_ids[0], NOW, cron="0 9 * * *")
    for call in (campaigns.pause_campaign, campaigns.resume_campaign, campaigns.delete_campaign):
        with pytest.raises(PermissionDenied):
            call(db_session, org.plain_user_id, campaign_id, now=NOW)
    with pytest.raises(PermissionDenied):
        campaigns.list_campaigns(db_session, org.plain_user_id, now=NOW)


# --- the dispatcher ------------------------------------------------------------------------

def test_due_occurrence_creates_one_confirmed_job_recording_its_campaign(db_session, org):
    course = org.course_ids[0]
    campaign_id = confirmed_campaign(db_session, org, course, NOW, cron="0 9 * * *", time_zone="UTC",
                                     completed_before_days=30, reason="annual refresher")
    due = datetime(2025, 3, 4, 9, 0, tzinfo=UTC)
    assert dispatch_due(db_session, due - timedelta(seconds=1)).outcomes == []

    result = dispatch_due(db_session, due + timedelta(seconds=20))
    [outcome] = result.outcomes
    assert (outcome.outcome, outcome.occurrence_at, outcome.missed) == ("queued", due, 0)
    assert outcome.next_occurrence_at == due + timedelta(days=1)
    [job] = campaign_jobs(db_session, campaign_id)
    assert job.id == outcome.job_id
    assert (job.state, job.scope, job.course_id, job.learner_id) == ("queued", "course", course, None)
    assert (job.origin, job.campaign_id, job.occurrence_at) == ("campaign", campaign_id, due)
    assert (job.actor_id, job.reason) == (org.admin_id, "annual refresher")
    assert job.completed_before == due - timedelta(days=30)
    assert job.confirmed_at is not None and job.token_hash is None
    assert job.summary == summarize(db_session, course, None, job.completed_before)
    [row] = occurrence_rows(db_session, campaign_id)
    assert (row.occurrence_at, row.outcome, row.job_id) == (due, "queued", job.id)
    assert db_session.get(RetrainingCampaign, campaign_id).next_occurrence_at == due + timedelta(days=1)
    audit = db_session.scalars(select(AuditEvent).where(AuditEvent.action == "campaign.occurrence_queued")).one()
    assert (audit.job_id, audit.campaign_id, audit.origin, audit.learner_count) == (job.id, campaign_id, "campaign", 1)

    # A replayed tick, or a later one before the next occurrence, does nothing.
    assert dispatch_due(db_session, due + timedelta(seconds=20)).outcomes == []
    assert dispatch_due(db_session, due + timedelta(hours=23)).outcomes == []
    assert len(campaign_jobs(db_session, campaign_id)) == 1


def test_occurrence_finding_the_course_being_reset_is_skipped_not_queued(db_session, org):
    course = org.course_ids[0]
    campaign_id = confirmed_campaign(db_session, org, course, NOW, cron="0 9 * * *", time_zone="UTC")
    req = resets.request(db_session, org.admin_id, course, reason="manual")
    active = resets.confirm(db_session, req.request_id, org.admin_id, req.token).job_id

    due = datetime(2025, 3, 4, 9, 0, tzinfo=UTC)
    [outcome] = dispatch_due(db_session, due).outcomes
    assert outcome.outcome == "skipped_active" and str(outcome.blocking_job_id) == active
    assert outcome.job_id is None and outcome.next_occurrence_at == due + timedelta(days=1)
    assert campaign_jobs(db_session, campaign_id) == []
    [row] = occurrence_rows(db_session, campaign_id)
    assert (row.outcome, str(row.job_id)) == ("skipped_active", active)
    assert f"is already being reset by job {active}" in row.detail
    assert "campaign.occurrence_skipped" in audit_actions(db_session, campaign_id)

    # Once the manual job is over, the next occurrence runs as usual.
    db_session.execute(update(ResetJob).where(ResetJob.id == outcome.blocking_job_id).values(state="succeeded"))
    [outcome] = dispatch_due(db_session, due + timedelta(days=1)).outcomes
    assert outcome.outcome == "queued"


def test_two_campaigns_of_one_course_due_together_make_one_job(db_session, org):
    course = org.course_ids[0]
    first = confirmed_campaign(db_session, org, course, NOW, cron="0 9 * * *", time_zone="UTC")
    second = confirmed_campaign(db_session, org, course, NOW, cron="0 9 * * *", time_zone="UTC",
                                completed_before_days=30)
    outcomes = {o.campaign_id: o for o in dispatch_due(db_session, datetime(2025, 3, 4, 9, 1, tzinfo=UTC)).outcomes}
    assert outcomes[first].outcome == "queued"
    assert outcomes[second].outcome == "skipped_active" and outcomes[second].blocking_job_id == outcomes[first].job_id


def test_occurrence_of_a_creator_who_lost_the_permission_is_skipped(db_session, org):
    campaign_id = confirmed_campaign(db_session, org, org.course_ids[0], NOW, cron="0 9 * * *", time_zone="UTC")
    db_session.execute(update(User).where(User.id == org.admin_id).values(permissions="platform.users"))
    [outcome] = dispatch_due(db_session, datetime(2025, 3, 4, 9, 0, tzinfo=UTC)).outcomes
    assert outcome.outcome == "skipped_invalid"
    assert "no longer holds training.manage" in outcome.detail
    assert campaign_jobs(db_session, campaign_id) == []
    assert occurrence_rows(db_session, campaign_id)[0].outcome == "skipped_invalid"


def test_a_campaign_whose_schedule_no_longer_evaluates_does_not_block_the_others(db_session, org):
    broken = confirmed_campaign(db_session, org, org.course_ids[0], NOW, cron="0 9 * * *", time_zone="UTC")
    healthy = confirmed_campaign(db_session, org, org.course_ids[1], NOW, cron="0 9 * * *", time_zone="UTC")
    db_session.execute(update(RetrainingCampaign).where(RetrainingCampaign.id == broken)
                       .values(time_zone="Gone/Zone"))
    due = datetime(2025, 3, 4, 9, 0, tzinfo=UTC)
    outcomes = {o.campaign_id: o.outcome for o in dispatch_due(db_session, due).outcomes}
    assert outcomes == {broken: "failed", healthy: "queued"}
    assert occurrence_rows(db_session, broken) == []
    assert db_session.get(RetrainingCampaign, broken).next_occurrence_at == due  # still due, retried next tick
