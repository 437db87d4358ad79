"""The ``completed_before_days`` audience, from the campaign to the reset pipeline.

A job the dispatcher creates carries ``completed_before = occurrence - N days``;
``summarize`` then counts exactly the learners whose completion is older, and
running the pipeline's plain functions in-process resets exactly those: the
others keep every row of their progress. Real PostgreSQL, rolled back per test.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from models.jobs import summarize
from models.schema import CourseAssignment, Notification
from models.campaign_dispatch import dispatch_due
from tests.reset_checks import assert_reset_exact, run_job_in_process, snapshot
from tests.test_campaigns_support import add_learner, campaign_jobs, confirmed_campaign, make_org

UTC = timezone.utc
CREATED = datetime(2025, 5, 1, 12, tzinfo=UTC)
OCCURRENCE = datetime(2025, 6, 2, 9, tzinfo=UTC)
DAYS = 30
CUTOFF = OCCURRENCE - timedelta(days=DAYS)


@pytest.fixture
def course_org(db_session):
    org = make_org(db_session, courses=2)
    course, other = org.course_ids
    add_learner(db_session, org, course, "ancient", completed_at=OCCURRENCE - timedelta(days=700))
    add_learner(db_session, org, course, "old", completed_at=OCCURRENCE - timedelta(days=31))
    add_learner(db_session, org, course, "old_quiet", completed_at=OCCURRENCE - timedelta(days=90), notify=False)
    add_learner(db_session, org, course, "just_inside", completed_at=CUTOFF - timedelta(seconds=1))
    add_learner(db_session, org, course, "exactly_n_days", completed_at=CUTOFF)  # not *older* than N days
    add_learner(db_session, org, course, "recent", completed_at=OCCURRENCE - timedelta(days=29))
    add_learner(db_session, org, course, "very_recent", completed_at=OCCURRENCE - timedelta(hours=1))
    add_learner(db_session, org, course, "in_progress", started_at=OCCURRENCE - timedelta(days=200))
    add_learner(db_session, org, course, "not_started")
    # The same people in another course: a reset of the first never touches it.
    for key in ("ancient", "recent"):
        add_learner(db_session, org, other, f"{key}_other", completed_at=OCCURRENCE - timedelta(days=400))
    return org


TARGETS = {"ancient", "old", "old_quiet", "just_inside"}


def older_than_cutoff(session, course_id):
    a = CourseAssignment
    return set(session.scalars(select(a.user_id).where(a.course_id == course_id, a.status == "completed",
                                                      a.completed_at < CUTOFF)).all())


def test_dispatched_job_targets_exactly_the_learners_completed_more_than_n_days_ago(db_session, course_org):
    org = course_org
    course = org.course_ids[0]
    campaign_id = confirmed_campaign(db_session, org, course, CREATED, cron="0 9 * * 1", time_zone="UTC",
                                     completed_before_days=DAYS)
    [outcome] = dispatch_due(db_session, OCCURRENCE + timedelta(seconds=40)).outcomes
    assert (outcome.outcome, outcome.occurrence_at) == ("queued", OCCURRENCE)
    [job] = campaign_jobs(db_session, campaign_id)
    assert job.completed_before == CUTOFF

    wanted = {org.learners[k] for k in TARGETS}
    assert older_than_cutoff(db_session, course) == wanted
    expected = {"learners": 4, "completions": 4, "certificates": 4, "learners_to_notify": 3}
    assert summarize(db_session, course, None, job.completed_before) == expected
    assert job.summary == expected


def test_pipeline_resets_only_the_audience_and_the_others_keep_their_progress(db_session, course_org):
    org = course_org
    course = org.course_ids[0]
    campaign_id = confirmed_campaign(db_session, org, course, CREATED, cron="0 9 * * 1", time_zone="UTC",
                                     completed_before_days=DAYS)
    before = snapshot(db_session, org.course_ids)
    [outcome] = dispatch_due(db_session, OCCURRENCE).outcomes
    job_id = str(outcome.job_id)

    result = run_job_in_process(db_session, job_id, batch_size=2)
    assert result.state == "succeeded"
    wanted = {org.learners[k] for k in TARGETS}
    # Exactly these reset (attempt + 1, no rows left, last reset job recorded), everyone and
    # everything else untouched, analytics exact, one notification per reset learner who wants it.
    assert_reset_exact(db_session, before, job_id, course, wanted)
    notified = set(db_session.scalars(select(Notification.user_id).where(Notification.reset_job_id == outcome.job_id)))
    assert notified == {org.learners[k] for k in ("ancient", "old", "just_inside")}
    [job] = campaign_jobs(db_session, campaign_id)
    assert (job.state, job.learners_done, job.origin) == ("succeeded", 4, "campaign")


def test_all_assigned_audience_resets_everyone_with_progress(db_session, course_org):
    org = course_org
    course = org.course_ids[0]
    confirmed_campaign(db_session, org, course, CREATED, cron="0 9 * * 1", time_zone="UTC")
    before = snapshot(db_session, org.course_ids)
    [outcome] = dispatch_due(db_session, OCCURRENCE).outcomes
    assert outcome.outcome == "queued"
    assert run_job_in_process(db_session, str(outcome.job_id), batch_size=3).state == "succeeded"
    wanted = {u for k, u in org.learners.items() if k not in {"not_started", "ancient_other", "recent_other"}}
    assert_reset_exact(db_session, before, str(outcome.job_id), course, wanted)
