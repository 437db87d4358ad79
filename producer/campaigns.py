"""Retraining campaigns, producer side: request, confirm, list, pause, resume, delete (R12).

A campaign resets a course on a calendar. Creating one is two-step like a
reset: :func:`request_campaign` validates everything, writes the campaign in
``awaiting_confirmation`` and returns a summary of who its first occurrence
would reset right now plus a one-time token; :func:`confirm_campaign` (same
actor, right token, in time) makes it ``active`` with its first occurrence
computed. Each occurrence then needs no further confirmation: the dispatcher
(:mod:`models.campaign_dispatch`) turns it into exactly one reset job.

Every function takes a ``Session`` and the acting user's id, never commits,
requires ``training.manage`` in the campaign's organization (another
organization's objects are reported as not found) and audits what it changes.
A refusal raises one of :mod:`models.errors` before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.audit import record_audit
from models.errors import Conflict, NotFound, PermissionDenied, TokenInvalid, ValidationFailed
from models.jobs import summarize
from models.schedule import (
    Schedule,
    build_schedule,
    check_start_not_stale,
    check_start_not_too_far,
    completed_before_for,
    describe,
    first_occurrence,
    gap_shorter_than,
    parse_cron,
    parse_every_months,
    parse_start,
    parse_time_zone,
    schedule_of,
)
from models.schema import (
    PERMISSION_TRAINING,
    CampaignOccurrence,
    Organization,
    RetrainingCampaign,
    User,
)
from models.settings import get_settings
from models.states import CampaignState
from models.text import check_storable
from models.times import as_utc, iso, utcnow
from models.tokens import new_token
from producer.access import actor_of, check_token, checked_reason, course_of

MAX_AUDIENCE_DAYS = 36500
PREVIEW_OCCURRENCES = 3


@dataclass(frozen=True)
class CampaignRequestResult:
    campaign_id: int
    token: str
    expires_at: datetime
    summary: dict
    schedule: str
    first_occurrences: list[datetime]
    time_zone: str

    def as_json(self) -> dict:
        return {
            "campaign_id": self.campaign_id,
            "request_id": self.campaign_id,
            "token": self.token,
            "expires_at": self.expires_at.isoformat(),
            "summary": self.summary,
            "schedule": self.schedule,
            "time_zone": self.time_zone,
            "first_occurrences": [o.isoformat() for o in self.first_occurrences],
            "state": CampaignState.AWAITING_CONFIRMATION,
        }


# --- who may act on what -------------------------------------------------------------------


def _check_permission(actor: User) -> None:
    if not actor.has_permission(PERMISSION_TRAINING):
        raise PermissionDenied(
            f"actor {actor.id} lacks the permission {PERMISSION_TRAINING} (Training: manage) needed for "
            "retraining campaigns"
        )



def _campaign_of(session: Session, actor: User, campaign_id: int, lock: bool = True) -> RetrainingCampaign:
    """The campaign, row-locked; another organization's or a deleted one is not found."""
    query = select(RetrainingCampaign).where(RetrainingCampaign.id == campaign_id)
    if lock:
        query = query.with_for_update()
    campaign = session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()
    if campaign is None or campaign.organization_id != actor.organization_id or campaign.state == "deleted":
        raise NotFound(f"campaign {campaign_id} not found")
    return campaign


# --- schedule helpers ----------------------------------------------------------------------

def _preview(schedule: Schedule, kind: str, now: datetime) -> list[datetime]:
    first = first_occurrence(schedule, kind, now)
    found = [first]
    for instant in schedule.occurrences_after(first):
        if len(found) >= PREVIEW_OCCURRENCES:
            break
        found.append(instant)
    return found


def _audience(completed_before_days: int | None) -> tuple[str, int | None]:
    if completed_before_days is None:
        return "all_assigned", None
    if isinstance(completed_before_days, bool) or not isinstance(completed_before_days, int):
        raise ValidationFailed(f"completed-before days must be a whole number, got {completed_before_days!r}")
    if completed_before_days < 1:
        raise ValidationFailed(
            f"completed-before days must be at least 1, got {completed_before_days} "
            "(omit it to target every assigned learner)"
        )
    if completed_before_days > MAX_AUDIENCE_DAYS:
        raise ValidationFailed(
            f"completed-before days must be at most {MAX_AUDIENCE_DAYS}, got {completed_before_days}"
        )
    return "completed_before_days", completed_before_days


def _human_interval(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}" + ("" if n == 1 else "s")
    return f"{int(seconds)} seconds"


def _check_interval(schedule: Schedule, first: datetime) -> None:
    """Refuse a schedule whose occurrences come closer than ``CAMPAIGN_MIN_INTERVAL_SECONDS`` (one day)."""
    minimum = timedelta(seconds=get_settings().campaign_min_interval_seconds)
    try:
        close = gap_shorter_than(schedule, first - timedelta(microseconds=1), minimum)
    except (OverflowError, ValueError):  # pragma: no cover - bounded by the start checks
        return
    if close is not None:
        a, b = close
        raise ValidationFailed(
            f"occurrences would be {_human_interval((b - a).total_seconds())} apart "
            f"({a.isoformat(timespec='minutes')} and {b.isoformat(timespec='minutes')} {schedule.zone.key}); "
            f"a campaign resets the course at most once every "
            f"{_human_interval(minimum.total_seconds())} (CAMPAIGN_MIN_INTERVAL_SECONDS)"
        )


# --- step 1: request -----------------------------------------------------------------------

def request_campaign(
    session: Session,
    actor_id: int,
    course_id: int,
    *,
    cron: str | None = None,
    every_months: int | None = None,
    start: datetime | date | str | None = None,
    time_zone: str | None = None,
    completed_before_days: int | None = None,
    reason: str = "",
    origin: str = "python",
    now: datetime | None = None,
) -> CampaignRequestResult:
    """Validate a campaign and issue its one-time confirmation token.

    Schedule: either ``cron`` (five fields, in ``time_zone``) or ``every_months``
    from ``start`` (a date, a local date-time in ``time_zone``, or an aware
    instant; at most one day in the past). ``time_zone`` defaults to the
    organization's. Audience: every assigned learner, or with
    ``completed_before_days`` only those whose completion is older than that
    many days at the occurrence. The summary counts whom the first occurrence
    would reset if it ran now. Writes nothing when it refuses.
    """
    now = now or utcnow()
    reason = checked_reason(reason)
    for field, value in (("cron", cron), ("start", start), ("time zone", time_zone)):
        check_storable(field, value)
    actor = actor_of(session, actor_id)
    course = course_of(session, actor, course_id)
    _check_permission(actor)

    if time_zone is None:
        organization = session.get(Organization, actor.organization_id)
        time_zone = organization.time_zone if organization is not None else "UTC"
    zone = parse_time_zone(time_zone)
    if (cron is None) == (every_months is None):
        raise ValidationFailed("give exactly one schedule: a cron expression or an interval in months")
    if cron is not None:
        if start is not None:
            raise ValidationFailed("a start date applies to a months schedule only; a cron schedule starts "
                                   "at its next matching time")
        kind, cron, start_at = "cron", parse_cron(cron), None
    else:
        kind, every_months = "months", parse_every_months(every_months)
        start_at = parse_start(start, zone)
        check_start_not_stale(start_at, now)
        check_start_not_too_far(start_at, now)
    audience, audience_days = _audience(completed_before_days)
    schedule = build_schedule(kind, time_zone=zone.key, cron_expression=cron, every_months=every_months,
                              start_at=start_at)
    try:
        preview = _preview(schedule, kind, now)
    except (OverflowError, ValueError):  # occurrences past year 9999
        raise ValidationFailed(
            "the schedule's occurrences fall beyond the year 9999; choose an earlier start"
        ) from None
    _check_interval(schedule, preview[0])

    summary = summarize(session, course.id, None, completed_before_for(audience_days, now))
    token, token_hash = new_token()
    expires_at = now + timedelta(seconds=get_settings().token_ttl_seconds)
    campaign = RetrainingCampaign(
        organization_id=actor.organization_id, course_id=course.id, audience=audience, audience_days=audience_days,
        schedule_kind=kind, cron_expression=cron, every_months=every_months, start_at=start_at,
        time_zone=zone.key, state=CampaignState.AWAITING_CONFIRMATION, next_occurrence_at=None, occurrences_done=0,
        created_by=actor.id, reason=reason, token_hash=token_hash, token_expires_at=expires_at, created_at=now,
    )
    session.add(campaign)
    session.flush()
    record_audit(session, "campaign.requested", actor.organization_id, actor_id=actor.id, course_id=course.id,
                 campaign_id=campaign.id, learner_count=summary["learners"], reason=reason, origin=origin,
                 details={"schedule": describe(schedule), "audience": audience, "audience_days": audience_days,
                          "first_occurrence": preview[0].isoformat()})
    return CampaignRequestResult(campaign.id, token, expires_at, summary, describe(schedule), preview, zone.key)


# --- step 2: confirm -----------------------------------------------------------------------

def confirm_campaign(
    session: Session, actor_id: int, campaign_id: int, token: str, *, origin: str = "python",
    now: datetime | None = None,
) -> dict:
    """Activate a requested campaign: the same actor, the right token, within its lifetime.

    Computes the first occurrence (stored in UTC) and audits. A wrong, expired
    or reused token changes nothing.
    """
    now = now or utcnow()
    actor = actor_of(session, actor_id)
    campaign = _campaign_of(session, actor, campaign_id)
    if campaign.created_by != actor.id:
        raise PermissionDenied(
            f"campaign {campaign.id} was requested by actor {campaign.created_by}; only they can confirm it"
        )
    if campaign.state != CampaignState.AWAITING_CONFIRMATION:
        raise TokenInvalid(f"campaign {campaign.id} was already confirmed (it is {campaign.state}); a token works once")
    check_token(f"campaign {campaign.id}", token, campaign.token_hash, campaign.token_expires_at, now,
                "request the campaign again")
    _check_permission(actor)
    course_of(session, actor, campaign.course_id)
    schedule = schedule_of(campaign)
    campaign.state = "active"
    campaign.confirmed_at = now
    campaign.token_hash = None
    campaign.next_occurrence_at = first_occurrence(schedule, campaign.schedule_kind, now)
    session.flush()
    record_audit(session, "campaign.confirmed", campaign.organization_id, actor_id=actor.id,
                 course_id=campaign.course_id, campaign_id=campaign.id, reason=campaign.reason, origin=origin,
                 details={"schedule": describe(schedule),
                          "next_occurrence_at": as_utc(campaign.next_occurrence_at).isoformat()})
    return campaign_view(session, campaign, now)


# --- list, pause, resume, delete -----------------------------------------------------------

def list_campaigns(
    session: Session, actor_id: int, *, course_id: int | None = None, include_deleted: bool = False,
    now: datetime | None = None,
) -> list[dict]:
    """The campaigns of the actor's organization (optionally of one course), oldest first."""
    now = now or utcnow()
    actor = actor_of(session, actor_id)
    _check_permission(actor)
    query = select(RetrainingCampaign).where(RetrainingCampaign.organization_id == actor.organization_id)
    if course_id is not None:
        course_of(session, actor, course_id)
        query = query.where(RetrainingCampaign.course_id == course_id)
    if not include_deleted:
        query = query.where(RetrainingCampaign.state != "deleted")
    campaigns = session.scalars(query.order_by(RetrainingCampaign.id)).all()
    return [campaign_view(session, c, now) for c in campaigns]


def pause_campaign(
    session: Session, actor_id: int, campaign_id: int, *, origin: str = "python", now: datetime | None = None
) -> dict:
    """Stop an active campaign's occurrences until it is resumed. Pausing a paused one changes nothing."""
    return _switch_state(session, actor_id, campaign_id, source="active", target="paused", action="campaign.paused",
                         rule="an active campaign can be paused", next_occurrence=lambda campaign, now: None,
                         origin=origin, now=now)


def resume_campaign(
    session: Session, actor_id: int, campaign_id: int, *, origin: str = "python", now: datetime | None = None
) -> dict:
    """Re-activate a paused campaign from its next occurrence after ``now``.

    Occurrences that fell due while it was paused are not run (nor recorded as
    missed): pausing means "not now". Resuming an active one changes nothing.
    """
    return _switch_state(session, actor_id, campaign_id, source="paused", target="active", action="campaign.resumed",
                         rule="a paused campaign can be resumed",
                         next_occurrence=lambda campaign, now: schedule_of(campaign).next_after(now),
                         origin=origin, now=now)


def _switch_state(session: Session, actor_id: int, campaign_id: int, *, source: str, target: str, action: str,
                  rule: str, next_occurrence, origin: str, now: datetime | None) -> dict:
    """Move a campaign from ``source`` to ``target`` state (already there: no change), audited."""
    now = now or utcnow()
    actor = actor_of(session, actor_id)
    _check_permission(actor)
    campaign = _campaign_of(session, actor, campaign_id)
    if campaign.state == target:
        return campaign_view(session, campaign, now) | {"changed": False}
    if campaign.state != source:
        raise Conflict(f"campaign {campaign.id} is {campaign.state}; only {rule}")
    campaign.state = target
    campaign.next_occurrence_at = next_occurrence(campaign, now)
    session.flush()
    record_audit(session, action, campaign.organization_id, actor_id=actor.id, course_id=campaign.course_id,
                 campaign_id=campaign.id, reason=campaign.reason, origin=origin,
                 details={"next_occurrence_at": iso(campaign.next_occurrence_at)})
    return campaign_view(session, campaign, now) | {"changed": True}


def delete_campaign(
    session: Session, actor_id: int, campaign_id: int, *, origin: str = "python", now: datetime | None = None
) -> dict:
    """End a campaign for good: no further occurrences.

    The row and its occurrence history stay (jobs and the audit trail refer to
    them); a job an earlier occurrence queued is not cancelled (use ``cancel``).
    """
    now = now or utcnow()
    actor = actor_of(session, actor_id)
    _check_permission(actor)
    campaign = _campaign_of(session, actor, campaign_id)
    previous = campaign.state
    campaign.state = "deleted"
    campaign.next_occurrence_at = None
    campaign.token_hash = None
    session.flush()
    record_audit(session, "campaign.deleted", campaign.organization_id, actor_id=actor.id,
                 course_id=campaign.course_id, campaign_id=campaign.id, reason=campaign.reason, origin=origin,
                 details={"previous_state": previous})
    return campaign_view(session, campaign, now)


# --- presentation --------------------------------------------------------------------------


def campaign_view(session: Session, campaign: RetrainingCampaign, now: datetime | None = None) -> dict:
    """The campaign as the CLI and the HTTP API show it (UTC instants, plus the next one in local time)."""
    now = now or utcnow()
    state = campaign.state
    if state == CampaignState.AWAITING_CONFIRMATION and as_utc(campaign.token_expires_at) <= now:
        state = CampaignState.EXPIRED
    try:
        schedule = schedule_of(campaign)
        description = describe(schedule)
    except ValidationFailed as exc:  # a time zone dropped from tzdata, say
        schedule, description = None, f"invalid schedule: {exc}"
    next_at = as_utc(campaign.next_occurrence_at)
    o = CampaignOccurrence
    last = session.execute(
        select(o.occurrence_at, o.outcome, o.job_id, o.detail)
        .where(o.campaign_id == campaign.id, o.outcome != "missed")
        .order_by(o.occurrence_at.desc()).limit(1)
    ).first()
    missed = session.scalar(
        select(func.count()).select_from(o).where(o.campaign_id == campaign.id, o.outcome == "missed")
    ) or 0
    return {
        "campaign_id": campaign.id,
        "organization_id": campaign.organization_id,
        "course_id": campaign.course_id,
        "state": state,
        "audience": campaign.audience,
        "audience_days": campaign.audience_days,
        "schedule_kind": campaign.schedule_kind,
        "cron_expression": campaign.cron_expression,
        "every_months": campaign.every_months,
        "start_at": iso(campaign.start_at),
        "time_zone": campaign.time_zone,
        "schedule": description,
        "next_occurrence_at": iso(next_at),
        "next_occurrence_local": (next_at.astimezone(schedule.zone).isoformat()
                                  if next_at is not None and schedule is not None else None),
        "occurrences_done": campaign.occurrences_done,
        "occurrences_missed_recorded": int(missed),
        "last_occurrence": None if last is None else {
            "occurrence_at": iso(last.occurrence_at), "outcome": last.outcome,
            "job_id": str(last.job_id) if last.job_id else None, "detail": last.detail,
        },
        "created_by": campaign.created_by,
        "created_at": iso(campaign.created_at),
        "confirmed_at": iso(campaign.confirmed_at),
        "reason": campaign.reason,
    }
