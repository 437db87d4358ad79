"""Schedule math of retraining campaigns (pure: no database).

Daylight-saving changes, month ends, 29 February, boundaries and validation.
The dispatcher's behaviour over the same calendars, driven tick by tick under
freezegun, is in tests/test_campaigns_schedule_ticks.py.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from itertools import islice, takewhile
from zoneinfo import ZoneInfo

import pytest

from models.errors import ValidationFailed
from models.schedule import (
    START_PAST_BOUND,
    CronSchedule,
    MonthlySchedule,
    add_months,
    build_schedule,
    check_start_not_stale,
    completed_before_for,
    first_occurrence,
    parse_cron,
    parse_every_months,
    parse_start,
    parse_time_zone,
    resolve_local,
)

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def take(schedule, after, n):
    return list(islice(schedule.occurrences_after(after), n))


def between(schedule, start, end):
    return list(takewhile(lambda t: t < end, schedule.occurrences_after(start)))


# --- local wall time -> UTC ---------------------------------------------------------------

@pytest.mark.parametrize("wall, zone, expected", [
    # Ordinary times.
    (datetime(2024, 1, 15, 9, 0), BERLIN, utc(2024, 1, 15, 8, 0)),
    (datetime(2024, 7, 15, 9, 0), BERLIN, utc(2024, 7, 15, 7, 0)),
    # Spring forward (02:00 -> 03:00): a time in the gap is the first instant after it.
    (datetime(2024, 3, 31, 2, 0), BERLIN, utc(2024, 3, 31, 1, 0)),
    (datetime(2024, 3, 31, 2, 30), BERLIN, utc(2024, 3, 31, 1, 0)),
    (datetime(2024, 3, 31, 3, 0), BERLIN, utc(2024, 3, 31, 1, 0)),
    (datetime(2024, 3, 10, 2, 30), NEW_YORK, utc(2024, 3, 10, 7, 0)),
    # Fall back (03:00 -> 02:00): a repeated time is its first occurrence (summer time).
    (datetime(2024, 10, 27, 2, 30), BERLIN, utc(2024, 10, 27, 0, 30)),
    (datetime(2024, 11, 3, 1, 30), NEW_YORK, utc(2024, 11, 3, 5, 30)),
    # A 30-minute DST shift (Lord Howe Island) and a whole skipped day (Samoa, 30 Dec 2011).
    (datetime(2024, 10, 6, 2, 15), ZoneInfo("Australia/Lord_Howe"), utc(2024, 10, 5, 15, 30)),
    (datetime(2011, 12, 30, 12, 0), ZoneInfo("Pacific/Apia"), utc(2011, 12, 30, 10, 0)),
])
def test_resolve_local(wall, zone, expected):
    assert resolve_local(wall, zone) == expected


# --- cron across daylight-saving changes ----------------------------------------------------

@pytest.mark.parametrize("zone, cron, start, end, expected", [
    # Daily 02:30 in Berlin: one firing per local day; on spring-forward day at 03:00 CEST.
    (BERLIN, "30 2 * * *", utc(2024, 3, 29), utc(2024, 4, 2),
     [utc(2024, 3, 29, 1, 30), utc(2024, 3, 30, 1, 30), utc(2024, 3, 31, 1, 0), utc(2024, 4, 1, 0, 30)]),
    # Daily 02:30 in Berlin across fall back: once, at the first (summer-time) 02:30.
    (BERLIN, "30 2 * * *", utc(2024, 10, 25), utc(2024, 10, 29),
     [utc(2024, 10, 25, 0, 30), utc(2024, 10, 26, 0, 30), utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)]),
    # Daily 01:30 in Berlin: untouched by either change.
    (BERLIN, "30 1 * * *", utc(2024, 3, 30), utc(2024, 4, 1, 1),
     [utc(2024, 3, 30, 0, 30), utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 23, 30)]),
    (BERLIN, "30 1 * * *", utc(2024, 10, 26), utc(2024, 10, 29),
     [utc(2024, 10, 26, 23, 30), utc(2024, 10, 28, 0, 30)]),
    # Daily 01:30 in New York: on fall-back day 01:30 exists twice -> once, at 01:30 EDT.
    (NEW_YORK, "30 1 * * *", utc(2024, 11, 2), utc(2024, 11, 5),
     [utc(2024, 11, 2, 5, 30), utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)]),
    # Daily 02:30 in New York: on spring-forward day it does not exist -> 03:00 EDT.
    (NEW_YORK, "30 2 * * *", utc(2024, 3, 9), utc(2024, 3, 12),
     [utc(2024, 3, 9, 7, 30), utc(2024, 3, 10, 7, 0), utc(2024, 3, 11, 6, 30)]),
    # Hourly: follows the wall clock; 02:00 (gap) and 03:00 land on one instant and fire once.
    (BERLIN, "0 * * * *", utc(2024, 3, 30, 23, 30), utc(2024, 3, 31, 3, 30),
     [utc(2024, 3, 31, 0), utc(2024, 3, 31, 1), utc(2024, 3, 31, 2), utc(2024, 3, 31, 3)]),
    # Hourly across fall back: the repeated 02:00 fires once.
    (BERLIN, "0 * * * *", utc(2024, 10, 26, 22, 30), utc(2024, 10, 27, 3, 30),
     [utc(2024, 10, 26, 23), utc(2024, 10, 27, 0), utc(2024, 10, 27, 2), utc(2024, 10, 27, 3)]),
])
def test_cron_across_dst(zone, cron, start, end, expected):
    schedule = CronSchedule(parse_cron(cron), zone)
    found = between(schedule, start, end)
    assert found == expected
    assert len(set(found)) == len(found)


@pytest.mark.parametrize("zone", [BERLIN, NEW_YORK, ZoneInfo("Australia/Sydney"), ZoneInfo("UTC")])
@pytest.mark.parametrize("cron_time", [(2, 30), (1, 30), (3, 0), (0, 0)])
def test_daily_cron_fires_exactly_once_every_local_day_for_two_years(zone, cron_time):
    hour_minute = f"{cron_time[1]} {cron_time[0]} * * *"
    schedule = CronSchedule(hour_minute, zone)
    found = between(schedule, utc(2024, 1, 1), utc(2026, 1, 1))
    days = [t.astimezone(zone).date() for t in found]
    assert len(days) == len(set(days))
    first, last = days[0], days[-1]
    assert len(days) == (last - first).days + 1  # no local day without its occurrence
    assert all(b > a for a, b in zip(found, found[1:]))


@pytest.mark.parametrize("zone, cron, instant, expected", [
    # Inside the repeated hour (02:15 CET, second pass): 02:30 CEST already happened.
    (BERLIN, "30 2 * * *", utc(2024, 10, 27, 1, 15), utc(2024, 10, 27, 0, 30)),
    (BERLIN, "30 2 * * *", utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 0, 30)),  # exactly at it
    (BERLIN, "30 2 * * *", utc(2024, 10, 27, 0, 29, 59), utc(2024, 10, 26, 0, 30)),
    (BERLIN, "30 2 * * *", utc(2024, 3, 31, 1, 0), utc(2024, 3, 31, 1, 0)),
    (BERLIN, "30 2 * * *", utc(2024, 3, 31, 0, 59), utc(2024, 3, 30, 1, 30)),
    (NEW_YORK, "30 1 * * *", utc(2024, 11, 3, 6, 45), utc(2024, 11, 3, 5, 30)),
    (ZoneInfo("UTC"), "*/15 * * * *", utc(2024, 5, 1, 12, 14, 59), utc(2024, 5, 1, 12, 0)),
])
def test_latest_at_or_before(zone, cron, instant, expected):
    assert CronSchedule(cron, zone).latest_at_or_before(instant) == expected


def test_occurrence_exactly_at_an_instant_is_at_or_before_it_but_not_after_it():
    schedule = CronSchedule("0 9 * * *", ZoneInfo("UTC"))
    tick = utc(2025, 5, 1, 9)
    assert schedule.latest_at_or_before(tick) == tick
    assert schedule.next_after(tick) == utc(2025, 5, 2, 9)
    assert schedule.next_after(tick - timedelta(microseconds=1)) == tick
    assert schedule.first_at_or_after(tick) == tick


# --- every N months ------------------------------------------------------------------------

def test_months_from_31_january_clamp_to_month_end_without_drifting():
    start = resolve_local(datetime(2025, 1, 31, 9, 0), BERLIN)
    schedule = MonthlySchedule(start, 1, BERLIN)
    local = [t.astimezone(BERLIN) for t in take(schedule, start - timedelta(seconds=1), 13)]
    assert [d.date() for d in local] == [
        date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 30), date(2025, 5, 31),
        date(2025, 6, 30), date(2025, 7, 31), date(2025, 8, 31), date(2025, 9, 30), date(2025, 10, 31),
        date(2025, 11, 30), date(2025, 12, 31), date(2026, 1, 31)]
    # 09:00 local wall time on both sides of the daylight-saving changes.
    assert {(d.hour, d.minute) for d in local} == {(9, 0)}


def test_months_in_a_leap_year_from_31_january():
    schedule = MonthlySchedule(resolve_local(datetime(2024, 1, 31), ZoneInfo("UTC")), 1, ZoneInfo("UTC"))
    assert [t.date() for t in take(schedule, utc(2024, 1, 30), 3)] == [
        date(2024, 1, 31), date(2024, 2, 29), date(2024, 3, 31)]


def test_every_12_months_from_29_february():
    start = resolve_local(datetime(2024, 2, 29, 0, 0), BERLIN)
    schedule = MonthlySchedule(start, 12, BERLIN)
    local = [t.astimezone(BERLIN).date() for t in take(schedule, start - timedelta(seconds=1), 6)]
    assert local == [date(2024, 2, 29), date(2025, 2, 28), date(2026, 2, 28), date(2027, 2, 28),
                     date(2028, 2, 29), date(2029, 2, 28)]


def test_every_3_months_and_the_latest_occurrence():
    start = utc(2025, 1, 15, 12)
    schedule = MonthlySchedule(start, 3, ZoneInfo("UTC"))
    assert schedule.latest_at_or_before(start - timedelta(seconds=1)) is None
    assert schedule.latest_at_or_before(start) == start
    assert schedule.latest_at_or_before(utc(2025, 9, 1)) == utc(2025, 7, 15, 12)
    assert schedule.next_after(utc(2025, 7, 15, 12)) == utc(2025, 10, 15, 12)
    assert schedule.next_after(utc(2030, 1, 1)) == utc(2030, 1, 15, 12)


def test_months_anchor_in_a_dst_gap_fires_after_the_gap():
    # 31 March 2024 02:30 does not exist in Berlin; 31 March 2025 02:30 does.
    start = resolve_local(datetime(2024, 3, 31, 2, 30), BERLIN)
    assert start == utc(2024, 3, 31, 1, 0)
    schedule = MonthlySchedule(start, 12, BERLIN)
    assert schedule.next_after(start).astimezone(BERLIN).replace(tzinfo=None) == datetime(2025, 3, 31, 3, 0)


def test_add_months_clamps():
    assert add_months(datetime(2023, 1, 31), 1) == datetime(2023, 2, 28)
    assert add_months(datetime(2023, 1, 31), 13) == datetime(2024, 2, 29)
    assert add_months(datetime(2024, 12, 31, 9, 5), 2) == datetime(2025, 2, 28, 9, 5)
    assert add_months(datetime(2024, 2, 29), 12) == datetime(2025, 2, 28)


def test_occurrences_between_keeps_a_bounded_number_and_caps_the_count():
    schedule = CronSchedule("* * * * *", ZoneInfo("UTC"))
    kept, count, capped = schedule.occurrences_between(utc(2025, 1, 1), utc(2025, 1, 8), keep=5, count_limit=1000)
    assert kept == [utc(2025, 1, 1, 0, m) for m in range(5)]
    assert (count, capped) == (1000, True)
    kept, count, capped = schedule.occurrences_between(utc(2025, 1, 1), utc(2025, 1, 1, 0, 30), 50, 1000)
    assert (len(kept), count, capped) == (30, 30, False)


# --- first occurrence, audience cut-off ------------------------------------------------------

def test_first_occurrence():
    now = utc(2025, 6, 1, 12)
    cron = CronSchedule("0 9 * * *", ZoneInfo("UTC"))
    assert first_occurrence(cron, "cron", now) == utc(2025, 6, 2, 9)
    # A months start up to a day old is honoured; an older one moves to its next date.
    recent = MonthlySchedule(now - timedelta(hours=20), 1, ZoneInfo("UTC"))
    assert first_occurrence(recent, "months", now) == now - timedelta(hours=20)
    stale = MonthlySchedule(now - timedelta(days=2), 1, ZoneInfo("UTC"))
    assert first_occurrence(stale, "months", now) == utc(2025, 6, 30, 12)


def test_completed_before_for():
    at = utc(2025, 6, 1, 9)
    assert completed_before_for(None, at) is None
    assert completed_before_for(30, at) == utc(2025, 5, 2, 9)


# --- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("expression, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("61 * * * *", "out of range"),
    ("* * *", "3 fields, expected five"),
    ("0 0 * * * *", "6 fields, expected five"),
    ("0 0 31 2 *", "never matches"),
    ("a b c d e", "malformed"),
    ("*/0 * * * *", "malformed"),
    ("@reboot", "unknown cron alias"),
])
def test_malformed_cron_is_refused(expression, message):
    with pytest.raises(ValidationFailed, match=message):
        parse_cron(expression)


def test_valid_cron_is_normalised():
    assert parse_cron("  30   2 * *  1-5 ") == "30 2 * * 1-5"
    assert parse_cron("@Daily") == "@daily"


@pytest.mark.parametrize("name", ["", None, "Mars/Olympus", "europe/berlin", "../etc/passwd", "localtime", "+02:00"])
def test_unknown_time_zone_is_refused(name):
    with pytest.raises(ValidationFailed, match="unknown time zone"):
        parse_time_zone(name)


@pytest.mark.parametrize("value, message", [
    (0, "at least 1"), (-3, "at least 1"), (121, "at most 120"), ("6", "whole number"), (1.5, "whole number"),
    (None, "whole number"), (True, "whole number"),
])
def test_bad_interval_is_refused(value, message):
    with pytest.raises(ValidationFailed, match=message):
        parse_every_months(value)


def test_parse_start():
    assert parse_start("2025-01-31", BERLIN) == utc(2025, 1, 30, 23)
    assert parse_start("2025-07-01T09:30", BERLIN) == utc(2025, 7, 1, 7, 30)
    assert parse_start("2025-07-01T09:30+00:00", BERLIN) == utc(2025, 7, 1, 9, 30)
    assert parse_start(date(2025, 7, 1), ZoneInfo("UTC")) == utc(2025, 7, 1)
    with pytest.raises(ValidationFailed, match="not an ISO-8601"):
        parse_start("31/01/2025", BERLIN)
    with pytest.raises(ValidationFailed, match="needs a start date"):
        parse_start(None, BERLIN)


def test_start_in_the_past_bound():
    now = utc(2025, 6, 1, 12)
    check_start_not_stale(now - START_PAST_BOUND, now)
    check_start_not_stale(now + timedelta(days=400), now)
    with pytest.raises(ValidationFailed, match="more than 1 day in the past"):
        check_start_not_stale(now - START_PAST_BOUND - timedelta(seconds=1), now)


def test_build_schedule_refuses_unknown_kind():
    with pytest.raises(ValidationFailed, match="unknown schedule kind"):
        build_schedule("weekly", time_zone="UTC")
