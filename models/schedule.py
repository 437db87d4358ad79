"""Schedule math of retraining campaigns: pure functions, no database, no Celery.

Two kinds of schedule, both evaluated over the *local wall time* of an IANA
time zone (the campaign's, which defaults to its organization's), with every
instant going in and out an aware UTC datetime:

- ``cron``: a five-field cron expression (``minute hour day-of-month month
  day-of-week``, or an alias such as ``@daily``), matched against local wall
  times by croniter and converted to UTC.
- ``months``: every N months from a start instant. The start's local wall time
  is the anchor; occurrence k is ``anchor + k*N months``, with the day clamped
  to the end of a shorter month, always computed from the anchor (never from
  the previous occurrence), so 31 Jan -> 29 Feb -> 31 Mar -> 30 Apr -> 31 May
  and 29 Feb 2024 -> 28 Feb 2025 -> ... -> 29 Feb 2028, without drifting.

Daylight-saving rules (docs/decisions/0003-campaign-schedules.md):

- A local time that does not exist (the clock springs forward over it) fires
  once, at the first valid instant after the gap (02:30 on a Berlin
  spring-forward day fires at 03:00 CEST = 01:00 UTC).
- A local time that exists twice (the clock falls back) fires once, at its
  first occurrence (the summer-time one).
- Several wall times that land on the same instant fire once.

So a daily cron fires exactly once per local day, and an hourly one follows
the wall clock (23 firings on a spring-forward day, 24 on a fall-back day).
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from models.errors import ValidationFailed

CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
MAX_EVERY_MONTHS = 120
# A months-schedule may start at most this long ago: a start of "today" (its
# midnight is already past) is fine, and its first occurrence runs on the next
# tick; an older one would fire an overdue reset the moment it is confirmed.
START_PAST_BOUND = timedelta(days=1)
# ... and start at most this far ahead: near year 9999 a schedule has no further
# date a datetime can hold, and a start a century out is a typo, not a plan.
START_FUTURE_BOUND = timedelta(days=36525)
# No time zone's offset changes by more than this at once.
_MAX_OFFSET_SHIFT = timedelta(hours=26)

UTC = timezone.utc


# --- validation ----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    # "localtime" depends on the host the dispatcher happens to run on.
    return frozenset(available_timezones()) - {"localtime"}


def parse_time_zone(name: str | None) -> ZoneInfo:
    """The IANA zone called ``name``; :class:`ValidationFailed` for anything else."""
    if not name or name not in _known_zones():
        raise ValidationFailed(f"unknown time zone {name!r}; use an IANA name such as 'Europe/Berlin' or 'UTC'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # pragma: no cover - listed but unreadable
        raise ValidationFailed(f"unknown time zone {name!r}; use an IANA name such as 'Europe/Berlin'") from None


def parse_cron(expression: str | None) -> str:
    """The normalised cron expression; :class:`ValidationFailed` if malformed or never due."""
    text = " ".join((expression or "").split())
    example = "e.g. '30 2 * * *' for 02:30 every day"
    if not text:
        raise ValidationFailed(f"the cron expression is empty; give five fields ({example})")
    if text.startswith("@"):
        if text.lower() not in CRON_ALIASES:
            raise ValidationFailed(f"unknown cron alias {text!r}; use one of {', '.join(CRON_ALIASES)}")
        text = text.lower()
    elif len(text.split()) != 5:
        raise ValidationFailed(
            f"malformed cron expression {text!r}: it has {len(text.split())} fields, expected five "
            f"(minute hour day-of-month month day-of-week; {example})"
        )
    try:
        it = croniter(text, datetime(2000, 1, 1))
    except (CroniterBadCronError, CroniterError, ValueError, KeyError, IndexError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationFailed(f"malformed cron expression {text!r}: {detail} ({example})") from None
    try:
        it.get_next(datetime)
    except CroniterBadDateError:
        raise ValidationFailed(f"the cron expression {text!r} never matches a date (e.g. 30 February)") from None
    return text


def parse_every_months(value: int | None) -> int:
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed(f"the interval must be a whole number of months, got {value!r}")
    if value < 1:
        raise ValidationFailed(f"the interval must be at least 1 month, got {value}")
    if value > MAX_EVERY_MONTHS:
        raise ValidationFailed(f"the interval must be at most {MAX_EVERY_MONTHS} months, got {value}")
    return value


def parse_start(value: datetime | date | str | None, zone: ZoneInfo) -> datetime:
    """The start instant in UTC.

    A date means local midnight in ``zone``; a naive datetime (or an ISO-8601
    string without an offset) is a local wall time in ``zone``; an aware one is
    that instant.
    """
    if value is None:
        raise ValidationFailed("a months schedule needs a start date (e.g. 2025-01-31 or 2025-01-31T09:00)")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            raise ValidationFailed(
                f"start {text!r} is not an ISO-8601 date or date-time (e.g. 2025-01-31 or 2025-01-31T09:00)"
            ) from None
    if not isinstance(value, datetime):
        value = datetime.combine(value, time(0, 0))
    try:
        if value.tzinfo is None:
            return resolve_local(value, zone)
        return value.astimezone(UTC)
    except (OverflowError, ValueError):  # year 1 or 9999 moved across an offset
        raise ValidationFailed(
            f"start {value.isoformat()} is out of range; choose a start within {START_FUTURE_BOUND.days // 365} "
            "years from now"
        ) from None


def check_start_not_stale(start: datetime, now: datetime) -> None:
    """Refuse a start more than :data:`START_PAST_BOUND` before ``now``."""
    if start < now - START_PAST_BOUND:
        raise ValidationFailed(
            f"start {start.isoformat()} is more than {START_PAST_BOUND.days} day in the past; "
            "choose a start from yesterday on (the schedule repeats from the start, so pick its next date)"
        )


def check_start_not_too_far(start: datetime, now: datetime) -> None:
    """Refuse a start more than :data:`START_FUTURE_BOUND` after ``now``."""
    if start > now + START_FUTURE_BOUND:
        raise ValidationFailed(
            f"start {start.isoformat()} is more than {START_FUTURE_BOUND.days // 365} years ahead; "
            "choose a start within that"
        )


# --- local wall time <-> UTC ---------------------------------------------------------------

def to_utc(value: datetime) -> datetime:
    """An aware UTC datetime; naive values are taken as UTC (SQLite hands them back naive)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def local_wall_time(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive local wall time of ``instant`` in ``zone``."""
    return to_utc(instant).astimezone(zone).replace(tzinfo=None)


def resolve_local(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant at which the naive local wall time ``wall`` happens in ``zone``.

    Ambiguous (clock falls back): the first of the two instants. Nonexistent
    (clock springs forward): the first valid instant after the gap.
    """
    wall = wall.replace(tzinfo=None, fold=0)
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if local_wall_time(first, zone) == wall:
        return first
    # In a gap: fold=0 and fold=1 use the offsets either side of the transition,
    # so the two instants bracket it. Find the transition to the second.
    other = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    lo = math.floor(min(first, other).timestamp())
    hi = math.ceil(max(first, other).timestamp())
    after_offset = _offset_at(hi, zone)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset_at(mid, zone) == after_offset:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _offset_at(timestamp: int, zone: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(timestamp, UTC).astimezone(zone).utcoffset()


# --- schedules -----------------------------------------------------------------------------

class Schedule:
    """A strictly increasing sequence of UTC instants."""

    zone: ZoneInfo

    def occurrences_after(self, after: datetime) -> Iterator[datetime]:
        """Every occurrence strictly after ``after``, ascending, each instant once."""
        raise NotImplementedError

    def latest_at_or_before(self, instant: datetime) -> datetime | None:
        """The last occurrence at or before ``instant``, or None if there is none."""
        raise NotImplementedError

    def next_after(self, after: datetime) -> datetime:
        """The first occurrence strictly after ``after``."""
        return next(self.occurrences_after(after))

    def first_at_or_after(self, instant: datetime) -> datetime:
        return self.next_after(to_utc(instant) - timedelta(microseconds=1))

    def occurrences_between(
        self, start: datetime, end: datetime, keep: int, count_limit: int
    ) -> tuple[list[datetime], int, bool]:
        """Occurrences in ``[start, end)``: the first ``keep`` of them, how many there are, and
        whether counting stopped at ``count_limit`` (the count is then a lower bound)."""
        kept: list[datetime] = []
        count = 0
        for instant in self.occurrences_after(to_utc(start) - timedelta(microseconds=1)):
            if instant >= end:
                return kept, count, False
            if count >= count_limit:
                return kept, count, True
            if len(kept) < keep:
                kept.append(instant)
            count += 1
        return kept, count, False  # pragma: no cover - schedules never end


@dataclass(frozen=True)
class CronSchedule(Schedule):
    expression: str
    zone: ZoneInfo

    def _walls(self, start_wall: datetime, backwards: bool = False) -> Iterator[datetime]:
        it = croniter(self.expression, start_wall)
        step = it.get_prev if backwards else it.get_next
        while True:
            try:
                yield step(datetime)
            except CroniterBadDateError:
                return

    def occurrences_after(self, after: datetime) -> Iterator[datetime]:
        after = to_utc(after)
        last = after
        # Wall times map to instants monotonically (never decreasing), so no wall time
        # before ``after``'s own can land after it; later ones that land at or before
        # it (the repeated hour after a fall back) are skipped.
        for wall in self._walls(local_wall_time(after, self.zone)):
            instant = resolve_local(wall, self.zone)
            if instant > last:
                yield instant
                last = instant

    def latest_at_or_before(self, instant: datetime) -> datetime | None:
        instant = to_utc(instant)
        latest = None
        # Wall times before ``instant``'s own land at or before it; the last of them is a
        # lower bound. Stepping forward from there also finds a wall time that reads later
        # on the clock but happened first (inside the hour repeated after a fall back).
        for wall in self._walls(local_wall_time(instant, self.zone), backwards=True):
            latest = resolve_local(wall, self.zone)
            break
        start = latest if latest is not None else instant - _MAX_OFFSET_SHIFT
        for candidate in self.occurrences_after(start):
            if candidate > instant:
                break
            latest = candidate
        return latest


def add_months(wall: datetime, months: int) -> datetime:
    """``wall`` plus ``months`` calendar months, the day clamped to the end of a shorter month."""
    index = wall.year * 12 + (wall.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(wall.day, calendar.monthrange(year, month)[1])
    return wall.replace(year=year, month=month, day=day)


@dataclass(frozen=True)
class MonthlySchedule(Schedule):
    start: datetime  # UTC; its local wall time in ``zone`` is the anchor
    every_months: int
    zone: ZoneInfo

    @property
    def anchor(self) -> datetime:
        return local_wall_time(self.start, self.zone)

    def occurrence(self, k: int) -> datetime:
        """Occurrence number ``k`` (0 is the start), computed from the anchor."""
        if k == 0:
            return to_utc(self.start)
        return resolve_local(add_months(self.anchor, k * self.every_months), self.zone)

    def _index_after(self, after: datetime) -> int:
        """The smallest k whose occurrence is strictly after ``after``."""
        anchor, wall = self.anchor, local_wall_time(after, self.zone)
        months = (wall.year - anchor.year) * 12 + (wall.month - anchor.month)
        k = max(0, months // self.every_months - 1)
        while k > 0 and self.occurrence(k - 1) > after:
            k -= 1
        while self.occurrence(k) <= after:
            k += 1
        return k

    def occurrences_after(self, after: datetime) -> Iterator[datetime]:
        k = self._index_after(to_utc(after))
        while True:
            yield self.occurrence(k)
            k += 1

    def latest_at_or_before(self, instant: datetime) -> datetime | None:
        k = self._index_after(to_utc(instant))
        return self.occurrence(k - 1) if k > 0 else None


def build_schedule(
    kind: str,
    *,
    time_zone: str,
    cron_expression: str | None = None,
    every_months: int | None = None,
    start_at: datetime | None = None,
) -> Schedule:
    """The schedule a campaign's stored columns describe; :class:`ValidationFailed` if they do not."""
    zone = parse_time_zone(time_zone)
    if kind == "cron":
        return CronSchedule(parse_cron(cron_expression), zone)
    if kind == "months":
        if start_at is None:
            raise ValidationFailed("a months schedule needs a start date")
        return MonthlySchedule(to_utc(start_at), parse_every_months(every_months), zone)
    raise ValidationFailed(f"unknown schedule kind {kind!r}; expected 'cron' or 'months'")


def gap_shorter_than(schedule: Schedule, after: datetime, minimum: timedelta,
                     span: timedelta = timedelta(days=400), limit: int = 1000) -> tuple[datetime, datetime] | None:
    """Two consecutive occurrences closer than ``minimum``, looking ``span`` (or ``limit`` occurrences) ahead.

    Gaps are measured on the schedule's own local wall clock (the times the
    cron expression names), so a daily schedule is one day apart even on the
    day a daylight-saving change moves one of its instants by an hour. A year
    and a month covers every pattern a five-field cron can make (day-of-week
    against day-of-month repeats yearly). Returns the pair as local wall
    times, or None when every gap is at least ``minimum``.
    """
    start_wall = local_wall_time(after, schedule.zone)
    if isinstance(schedule, CronSchedule):
        walls: Iterator[datetime] = schedule._walls(start_wall)
    else:
        walls = (local_wall_time(instant, schedule.zone) for instant in schedule.occurrences_after(after))
    previous: datetime | None = None
    for count, wall in enumerate(walls):
        if previous is not None and wall - previous < minimum:
            return previous, wall
        if wall > start_wall + span or count >= limit:
            return None
        previous = wall
    return None


def describe(schedule: Schedule) -> str:
    """A short human description, e.g. ``cron '30 2 * * *' in Europe/Berlin``."""
    if isinstance(schedule, CronSchedule):
        return f"cron '{schedule.expression}' in {schedule.zone.key}"
    assert isinstance(schedule, MonthlySchedule)
    unit = "month" if schedule.every_months == 1 else f"{schedule.every_months} months"
    return f"every {unit} from {schedule.anchor.isoformat(timespec='minutes')} {schedule.zone.key}"


def schedule_of(campaign) -> Schedule:
    """The schedule a stored ``RetrainingCampaign`` row describes."""
    return build_schedule(
        campaign.schedule_kind, time_zone=campaign.time_zone, cron_expression=campaign.cron_expression,
        every_months=campaign.every_months, start_at=campaign.start_at,
    )


def first_occurrence(schedule: Schedule, kind: str, now: datetime) -> datetime:
    """The first occurrence of a campaign confirmed (or requested) at ``now``.

    A cron campaign starts with its next instant after ``now``. A months
    campaign starts at its start date; a start up to :data:`START_PAST_BOUND`
    old is still honoured (the dispatcher runs it on its next tick).
    """
    if kind == "months":
        return schedule.first_at_or_after(to_utc(now) - START_PAST_BOUND)
    return schedule.next_after(now)


def completed_before_for(audience_days: int | None, at: datetime) -> datetime | None:
    """The audience cut-off at instant ``at``: completions older than ``audience_days`` days of 24 hours."""
    return to_utc(at) - timedelta(days=audience_days) if audience_days else None
