"""The dispatcher over real calendars, one beat tick at a time under freezegun.

Each test freezes the clock, creates and confirms a campaign with the real
clock functions, then moves the frozen clock tick by tick and runs what the
``campaigns.dispatch_due`` task runs: ``dispatch_due(session, utcnow())``.
Between ticks a stand-in for the reset pipeline finishes the queued jobs, so
every occurrence is free to run. Real PostgreSQL, rolled back per test.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from models import campaign_dispatch as dispatcher
from models.campaign_dispatch import dispatch_due
from models.schema import AuditEvent, RetrainingCampaign
from models.times import utcnow
from tests.test_campaigns_support import (
    add_learner,
    campaign_jobs,
    confirmed_campaign,
    finish_active_jobs,
    make_org,
    occurrence_rows,
)

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def run_beat(session, freezer, start: datetime, end: datetime, step: timedelta) -> list:
    """Tick from ``start`` to ``end`` (inclusive) every ``step``; return every dispatch outcome."""
    outcomes = []
    tick = start
    while tick <= end:
        freezer.move_to(tick)
        result = dispatch_due(session, utcnow())
        if result.outcomes:
            outcomes.extend(result.outcomes)
            finish_active_jobs(session, tick)
        tick += step
    return outcomes


def setup_campaign(session, zone: str, created: datetime, **schedule) -> int:
    org = make_org(session, time_zone=zone, courses=1)
    add_learner(session, org, org.course_ids[0], "done", completed_at=created - timedelta(days=500))
    return confirmed_campaign(session, org, org.course_ids[0], utcnow(), **schedule)


# --- daylight-saving changes: a beat every minute -------------------------------------------

DST_CASES = [
    # zone, cron, beat from, beat to, expected occurrences (UTC)
    pytest.param("Europe/Berlin", "30 2 * * *", utc(2024, 3, 29, 22), utc(2024, 4, 1, 3),
                 [utc(2024, 3, 30, 1, 30), utc(2024, 3, 31, 1, 0), utc(2024, 4, 1, 0, 30)],
                 id="berlin-02:30-spring-forward"),
    pytest.param("Europe/Berlin", "30 2 * * *", utc(2024, 10, 25, 22), utc(2024, 10, 28, 3),
                 [utc(2024, 10, 26, 0, 30), utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)],
                 id="berlin-02:30-fall-back"),
    pytest.param("Europe/Berlin", "30 1 * * *", utc(2024, 10, 25, 22), utc(2024, 10, 28, 3),
                 [utc(2024, 10, 25, 23, 30), utc(2024, 10, 26, 23, 30), utc(2024, 10, 28, 0, 30)],
                 id="berlin-01:30-fall-back"),
    pytest.param("America/New_York", "30 1 * * *", utc(2024, 11, 2, 3), utc(2024, 11, 5, 5),
                 [utc(2024, 11, 2, 5, 30), utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)],
                 id="new-york-01:30-fall-back"),
    pytest.param("America/New_York", "30 2 * * *", utc(2024, 3, 9, 4), utc(2024, 3, 12, 5),
                 [utc(2024, 3, 9, 7, 30), utc(2024, 3, 10, 7, 0), utc(2024, 3, 11, 6, 30)],
                 id="new-york-02:30-spring-forward"),
    pytest.param("America/New_York", "30 1 * * *", utc(2024, 3, 9, 4), utc(2024, 3, 12, 5),
                 [utc(2024, 3, 9, 6, 30), utc(2024, 3, 10, 6, 30), utc(2024, 3, 11, 5, 30)],
                 id="new-york-01:30-spring-forward"),
]


@pytest.mark.parametrize("zone, cron, beat_from, beat_to, expected", DST_CASES)
def test_daily_cron_across_a_dst_change_runs_once_per_local_day(db_session, zone, cron, beat_from, beat_to,
                                                                expected):
    with freeze_time(beat_from - timedelta(hours=1)) as freezer:
        campaign_id = setup_campaign(db_session, zone, beat_from, cron=cron)
        outcomes = run_beat(db_session, freezer, beat_from, beat_to, timedelta(minutes=1))
    assert [(o.occurrence_at, o.outcome, o.missed) for o in outcomes] == [(t, "queued", 0) for t in expected]
    jobs = campaign_jobs(db_session, campaign_id)
    assert [j.occurrence_at for j in jobs] == expected
    # Each ran on the tick at its instant: the minute beat lands exactly on every occurrence.
    assert [j.created_at for j in jobs] == expected
    local_days = [t.astimezone(ZoneInfo(zone)).date() for t in expected]
    assert len(set(local_days)) == len(local_days) == (local_days[-1] - local_days[0]).days + 1
    assert [r.outcome for r in occurrence_rows(db_session, campaign_id)] == ["queued"] * len(expected)


# --- month ends and 29 February: a beat once a day -------------------------------------------

def test_every_month_from_31_january_follows_month_ends(db_session):
    with freeze_time(utc(2025, 1, 20, 12)) as freezer:
        campaign_id = setup_campaign(db_session, "Europe/Berlin", utc(2025, 1, 20), every_months=1,
                                     start="2025-01-31T09:00")
        # 10:00 UTC is after 09:00 local in winter (08:00 UTC) and in summer (07:00 UTC).
        outcomes = run_beat(db_session, freezer, utc(2025, 1, 21, 10), utc(2026, 2, 1, 10), timedelta(days=1))
    berlin = ZoneInfo("Europe/Berlin")
    local = [o.occurrence_at.astimezone(berlin) for o in outcomes]
    assert [d.date() for d in local] == [
        date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 30), date(2025, 5, 31),
        date(2025, 6, 30), date(2025, 7, 31), date(2025, 8, 31), date(2025, 9, 30), date(2025, 10, 31),
        date(2025, 11, 30), date(2025, 12, 31), date(2026, 1, 31)]
    assert {(d.hour, d.minute) for d in local} == {(9, 0)}
    assert {o.outcome for o in outcomes} == {"queued"} and sum(o.missed for o in outcomes) == 0
    assert len(campaign_jobs(db_session, campaign_id)) == 13


def test_every_12_months_from_29_february(db_session):
    with freeze_time(utc(2024, 2, 28, 12)) as freezer:
        campaign_id = setup_campaign(db_session, "UTC", utc(2024, 2, 28), every_months=12, start="2024-02-29")
        outcomes = run_beat(db_session, freezer, utc(2024, 2, 28, 12), utc(2028, 3, 2, 12), timedelta(days=1))
    assert [o.occurrence_at for o in outcomes] == [
        utc(2024, 2, 29), utc(2025, 2, 28), utc(2026, 2, 28), utc(2027, 2, 28), utc(2028, 2, 29)]
    assert [j.created_at.date() for j in campaign_jobs(db_session, campaign_id)] == [
        date(2024, 2, 29), date(2025, 2, 28), date(2026, 2, 28), date(2027, 2, 28), date(2028, 2, 29)]


# --- exactly at the tick -------------------------------------------------------------------

def test_occurrence_exactly_at_the_tick_runs_on_that_tick_and_not_before(db_session):
    occurrence = utc(2025, 5, 6, 9)
    with freeze_time(utc(2025, 5, 5, 12)) as freezer:
        campaign_id = setup_campaign(db_session, "UTC", utc(2025, 5, 5), cron="0 9 * * *")
        freezer.move_to(occurrence - timedelta(microseconds=1))
        assert dispatch_due(db_session, utcnow()).outcomes == []
        freezer.move_to(occurrence)
        [outcome] = dispatch_due(db_session, utcnow()).outcomes
        assert (outcome.occurrence_at, outcome.outcome) == (occurrence, "queued")
        assert outcome.next_occurrence_at == occurrence + timedelta(days=1)
        assert dispatch_due(db_session, utcnow()).outcomes == []  # the same tick replayed
    [job] = campaign_jobs(db_session, campaign_id)
    assert job.occurrence_at == job.created_at == occurrence


# --- a beat that was down ------------------------------------------------------------------

def test_beat_down_for_a_week_catches_up_with_one_job_and_records_the_missed(db_session):
    berlin = ZoneInfo("Europe/Berlin")
    with freeze_time(utc(2025, 3, 2, 12)) as freezer:
        campaign_id = setup_campaign(db_session, "Europe/Berlin", utc(2025, 3, 2), cron="0 9 * * *",
                                     completed_before_days=30)
        # 09:00 CET = 08:00 UTC. Day 0 runs; then the beat is down until day 7, 09:30 local.
        first = run_beat(db_session, freezer, utc(2025, 3, 3, 8), utc(2025, 3, 3, 8), timedelta(minutes=1))
        assert [o.outcome for o in first] == ["queued"]
        finish_active_jobs(db_session, utcnow())
        freezer.move_to(utc(2025, 3, 10, 8, 30))
        [outcome] = dispatch_due(db_session, utcnow()).outcomes
        assert dispatch_due(db_session, utcnow()).outcomes == []
        finish_active_jobs(db_session, utcnow())
        later = run_beat(db_session, freezer, utc(2025, 3, 10, 8, 31), utc(2025, 3, 11, 8), timedelta(minutes=1))

    assert (outcome.outcome, outcome.occurrence_at, outcome.missed) == ("queued", utc(2025, 3, 10, 8), 6)
    assert "6 earlier occurrence(s) missed since 2025-03-04T08:00:00+00:00" in outcome.detail
    rows = occurrence_rows(db_session, campaign_id)
    assert [(r.occurrence_at.astimezone(berlin).day, r.outcome) for r in rows] == (
        [(3, "queued")] + [(d, "missed") for d in range(4, 10)] + [(10, "queued"), (11, "queued")])
    jobs = campaign_jobs(db_session, campaign_id)
    assert [j.occurrence_at for j in jobs] == [utc(2025, 3, 3, 8), utc(2025, 3, 10, 8), utc(2025, 3, 11, 8)]
    # The catch-up job's audience is measured from its own occurrence.
    assert jobs[1].completed_before == utc(2025, 3, 10, 8) - timedelta(days=30)
    assert [o.occurrence_at for o in later] == [utc(2025, 3, 11, 8)]
    audit = db_session.scalars(select(AuditEvent).where(AuditEvent.job_id == jobs[1].id)).one()
    assert audit.details["missed"] == 6
    assert db_session.get(RetrainingCampaign, campaign_id).occurrences_done == 3


def test_a_very_long_outage_records_a_bounded_number_of_missed_occurrences(db_session, use_env):
    use_env(CAMPAIGN_MIN_INTERVAL_SECONDS="60")  # one occurrence a minute
    with freeze_time(utc(2025, 3, 2, 12)) as freezer:
        campaign_id = setup_campaign(db_session, "UTC", utc(2025, 3, 2), cron="* * * * *")
        freezer.move_to(utc(2025, 3, 9, 12))  # a week of one occurrence a minute
        [outcome] = dispatch_due(db_session, utcnow()).outcomes
    assert (outcome.outcome, outcome.occurrence_at) == ("queued", utc(2025, 3, 9, 12))
    assert (outcome.missed, outcome.missed_count_capped) == (dispatcher.MISSED_COUNT_LIMIT, True)
    assert f"{dispatcher.MISSED_COUNT_LIMIT}+ earlier occurrence(s) missed" in outcome.detail
    rows = occurrence_rows(db_session, campaign_id)
    missed = [r for r in rows if r.outcome == "missed"]
    assert len(missed) == dispatcher.MISSED_RECORD_LIMIT
    assert missed[0].occurrence_at == utc(2025, 3, 2, 12, 1)
    assert len(campaign_jobs(db_session, campaign_id)) == 1
