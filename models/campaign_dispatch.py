"""Retraining campaigns: turning due occurrences into reset jobs.

Beat runs the ``campaigns.dispatch_due`` task (``tasks/campaigns.py``) every minute on the
``maintenance`` queue; ``progress-reset campaign run-due --at`` runs the same plain function,
:func:`dispatch_due`, at a chosen instant. The
schedule lives in the database (``retraining_campaigns.next_occurrence_at``),
never in the broker as ETA/countdown tasks.

Guarantees (docs/campaigns.md, docs/decisions/0003-campaign-schedules.md):

- Exactly one reset job per occurrence. The due campaign rows are locked
  ``FOR UPDATE SKIP LOCKED`` (two dispatchers split the campaigns between
  them), each occurrence is claimed by inserting its ``campaign_occurrences``
  row (primary key ``(campaign_id, occurrence_at)``, ``ON CONFLICT DO
  NOTHING``) and ``reset_jobs`` is unique on the same pair. The claim, the
  job, the audit record and the advanced ``next_occurrence_at`` commit
  together, so a replayed tick or a dispatcher killed half-way never makes a
  second job and never loses an occurrence.
- A dispatcher that was down catches up with one job per campaign, for the
  latest due occurrence; the earlier ones are recorded as ``missed``.
- An occurrence that finds the course already being reset is recorded as
  ``skipped_active`` (with the active job's id), not queued behind it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import dialect
from models.audit import record_audit
from models.errors import Conflict, ValidationFailed
from models.jobs import activate_job, find_active_job, summarize
from models.logs import log_event
from models.messaging import publish_after_commit
from models.schedule import completed_before_for, schedule_of, to_utc
from models.schema import PERMISSION_TRAINING, CampaignOccurrence, Course, ResetJob, RetrainingCampaign, User
from models.states import CampaignState, JobScope, JobState, OccurrenceState
from models.times import as_utc, utcnow

# Due campaigns are locked and handled this many at a time; a second dispatcher
# skips the locked ones and takes the next chunk.
CLAIM_CHUNK = 50
# A long outage records at most this many missed occurrences per campaign (the
# earliest ones); the count of all of them (up to MISSED_COUNT_LIMIT) goes on the
# claimed occurrence and in the audit trail.
MISSED_RECORD_LIMIT = 50
MISSED_COUNT_LIMIT = 10_000

occurrences = CampaignOccurrence.__table__


@dataclass(frozen=True)
class OccurrenceOutcome:
    """What one due campaign's tick did."""

    campaign_id: int
    occurrence_at: datetime | None
    outcome: str  # queued | skipped_active | skipped_invalid | already_claimed | failed
    job_id: uuid.UUID | None = None
    blocking_job_id: uuid.UUID | None = None
    missed: int = 0
    missed_count_capped: bool = False
    next_occurrence_at: datetime | None = None
    detail: str = ""

    def as_json(self) -> dict:
        return {
            "campaign_id": self.campaign_id,
            "occurrence_at": self.occurrence_at.isoformat() if self.occurrence_at else None,
            "outcome": self.outcome,
            "job_id": str(self.job_id) if self.job_id else None,
            "blocking_job_id": str(self.blocking_job_id) if self.blocking_job_id else None,
            "missed": self.missed,
            "missed_count_capped": self.missed_count_capped,
            "next_occurrence_at": self.next_occurrence_at.isoformat() if self.next_occurrence_at else None,
            "detail": self.detail,
        }


@dataclass
class DispatchResult:
    at: datetime
    outcomes: list[OccurrenceOutcome] = field(default_factory=list)

    @property
    def job_ids(self) -> list[str]:
        return [str(o.job_id) for o in self.outcomes if o.outcome == OccurrenceState.QUEUED]

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    def as_json(self) -> dict:
        return {
            "at": self.at.isoformat(),
            "due": len(self.outcomes),
            "queued": self.count(OccurrenceState.QUEUED),
            "skipped_active": self.count(OccurrenceState.SKIPPED_ACTIVE),
            "skipped_invalid": self.count(OccurrenceState.SKIPPED_INVALID),
            "missed": sum(o.missed for o in self.outcomes),
            "job_ids": self.job_ids,
            "occurrences": [o.as_json() for o in self.outcomes],
        }


def dispatch_due(session: Session, now: datetime) -> DispatchResult:
    """Create the reset job of every campaign occurrence due at ``now``, in the caller's transaction.

    ``now`` decides what is due (the beat passes the clock, ``run-due --at`` an
    instant of the operator's choice); the jobs' own timestamps use the real
    clock. ``resets.start`` is published for each job after commit. Safe to
    run twice and from two processes at once: see the module docstring.
    """
    now = to_utc(now)
    result = DispatchResult(now)
    is_postgres = dialect.is_postgres(session)
    # A handled campaign is no longer due (its next occurrence is past ``now``);
    # only one whose dispatch failed must be left out explicitly.
    failed: set[int] = set()
    c = RetrainingCampaign
    while True:
        query = (
            select(c)
            .where(c.state == CampaignState.ACTIVE, c.next_occurrence_at <= now)
            # Course order: every dispatcher takes course-row locks in the same order.
            .order_by(c.course_id, c.id)
            .limit(CLAIM_CHUNK)
            .execution_options(populate_existing=True)
        )
        if failed:
            query = query.where(c.id.not_in(failed))
        if is_postgres:
            query = query.with_for_update(skip_locked=True)
        campaigns = session.scalars(query).all()
        if not campaigns:
            break
        for campaign in campaigns:
            outcome = _dispatch_one(session, campaign, now)
            if outcome.outcome == OccurrenceState.FAILED:
                failed.add(campaign.id)
            result.outcomes.append(outcome)
    # Published after the outer commit; a savepoint ending on the way (activate_job opens one
    # per job) neither publishes nor drops them (models.messaging).
    for job_id in result.job_ids:
        publish_after_commit(session, "resets.start", [job_id])
    return result


@dataclass(frozen=True)
class _Plan:
    """What a due campaign's tick will do, worked out before anything is written."""

    latest: datetime  # the occurrence to run
    next_at: datetime  # the campaign's next occurrence afterwards
    missed: list[datetime]  # the earliest skipped ones, to record
    missed_count: int
    missed_capped: bool


def _plan(campaign: RetrainingCampaign, now: datetime) -> _Plan:
    schedule = schedule_of(campaign)
    first_due = as_utc(campaign.next_occurrence_at)
    latest = schedule.latest_at_or_before(now)
    if latest is None or latest < first_due:
        latest = first_due  # next_occurrence_at is itself an occurrence; never skip it
    missed, count, capped = schedule.occurrences_between(first_due, latest, MISSED_RECORD_LIMIT, MISSED_COUNT_LIMIT)
    return _Plan(latest, schedule.next_after(max(now, latest)), missed, count, capped)


def _dispatch_one(session: Session, campaign: RetrainingCampaign, now: datetime) -> OccurrenceOutcome:
    """One locked, due campaign."""
    try:
        plan = _plan(campaign, now)
    except (ValidationFailed, ValueError, OverflowError) as exc:
        # A stored schedule that no longer evaluates (a zone dropped from tzdata, say). Nothing is
        # written: the campaign stays due and is logged every tick until someone fixes or deletes it.
        log_event("campaign.dispatch.failed", logging.ERROR, campaign_id=campaign.id, error=str(exc))
        return OccurrenceOutcome(campaign.id, None, OccurrenceState.FAILED, detail=str(exc))
    return _dispatch_campaign(session, campaign, plan)


def _dispatch_campaign(session: Session, campaign: RetrainingCampaign, plan: _Plan) -> OccurrenceOutcome:
    # Every refusal below is decided before its row is written, so the claim, the job and the
    # outcome row commit together or not at all.
    latest, next_at, missed_count, capped = plan.latest, plan.next_at, plan.missed_count, plan.missed_capped
    clock = utcnow()

    claimed = session.execute(
        dialect.insert(session, occurrences)
        .values(campaign_id=campaign.id, occurrence_at=latest, outcome=OccurrenceState.QUEUED, job_id=None, detail="",
                recorded_at=clock)
        .on_conflict_do_nothing()
        .returning(occurrences.c.campaign_id)
    ).first() is not None
    campaign.next_occurrence_at = next_at
    if not claimed:
        # Another dispatcher recorded this occurrence (it also advanced the campaign).
        log_event("campaign.occurrence.already_claimed", campaign_id=campaign.id, occurrence_at=latest.isoformat())
        return OccurrenceOutcome(campaign.id, latest, "already_claimed", next_occurrence_at=next_at)

    catch_up = ""
    if plan.missed:
        _record_missed(session, campaign, plan, clock)
        catch_up = (f"caught up: {missed_count}{'+' if capped else ''} earlier occurrence(s) missed since "
                    f"{plan.missed[0].isoformat()}, {len(plan.missed)} recorded")

    problem = _why_not_runnable(session, campaign)
    if problem is not None:
        detail = "; ".join(filter(None, [problem, catch_up]))
        _set_outcome(session, campaign.id, latest, OccurrenceState.SKIPPED_INVALID, None, detail)
        record_audit(session, "campaign.occurrence_skipped", campaign.organization_id, actor_id=campaign.created_by,
                     course_id=campaign.course_id, campaign_id=campaign.id, reason=campaign.reason,
                     origin="campaign", details={"occurrence_at": latest.isoformat(), "why": problem,
                                                 "missed": missed_count})
        log_event("campaign.occurrence.skipped", logging.WARNING, campaign_id=campaign.id,
                  occurrence_at=latest.isoformat(), outcome=OccurrenceState.SKIPPED_INVALID)
        return OccurrenceOutcome(campaign.id, latest, OccurrenceState.SKIPPED_INVALID, missed=missed_count,
                                 missed_count_capped=capped, next_occurrence_at=next_at, detail=detail)

    completed_before = completed_before_for(campaign.audience_days, latest)
    summary = summarize(session, campaign.course_id, None, completed_before)
    job = ResetJob(
        id=uuid.uuid4(), organization_id=campaign.organization_id, course_id=campaign.course_id, learner_id=None,
        scope=JobScope.COURSE, state=JobState.AWAITING_CONFIRMATION, actor_id=campaign.created_by, reason=campaign.reason,
        origin="campaign", campaign_id=campaign.id, occurrence_at=latest, completed_before=completed_before,
        summary=summary, learners_total=summary["learners"], cleared={}, created_at=clock,
    )
    try:
        # activate_job inserts the job only once it knows the course is free.
        activate_job(session, job, clock)
    except Conflict as exc:
        blocking = find_active_job(session, campaign.course_id)
        blocking_id = blocking.id if blocking is not None else None
        detail = "; ".join(filter(None, [str(exc), catch_up]))
        _set_outcome(session, campaign.id, latest, OccurrenceState.SKIPPED_ACTIVE, blocking_id, detail)
        record_audit(session, "campaign.occurrence_skipped", campaign.organization_id, actor_id=campaign.created_by,
                     course_id=campaign.course_id, campaign_id=campaign.id, reason=campaign.reason,
                     origin="campaign",
                     details={"occurrence_at": latest.isoformat(), "why": "course already being reset",
                              "blocking_job_id": str(blocking_id) if blocking_id else None,
                              "missed": missed_count})
        log_event("campaign.occurrence.skipped", campaign_id=campaign.id, occurrence_at=latest.isoformat(),
                  outcome=OccurrenceState.SKIPPED_ACTIVE, blocking_job_id=str(blocking_id))
        return OccurrenceOutcome(campaign.id, latest, OccurrenceState.SKIPPED_ACTIVE, blocking_job_id=blocking_id,
                                 missed=missed_count, missed_count_capped=capped, next_occurrence_at=next_at,
                                 detail=detail)

    _set_outcome(session, campaign.id, latest, OccurrenceState.QUEUED, job.id, catch_up)
    campaign.occurrences_done = (campaign.occurrences_done or 0) + 1
    record_audit(session, "campaign.occurrence_queued", campaign.organization_id, actor_id=campaign.created_by,
                 course_id=campaign.course_id, job_id=job.id, campaign_id=campaign.id,
                 learner_count=summary["learners"], reason=campaign.reason, origin="campaign",
                 details={"occurrence_at": latest.isoformat(),
                          "completed_before": completed_before.isoformat() if completed_before else None,
                          "missed": missed_count})
    log_event("campaign.occurrence.queued", campaign_id=campaign.id, job_id=str(job.id),
              occurrence_at=latest.isoformat(), learners=summary["learners"], missed=missed_count)
    return OccurrenceOutcome(campaign.id, latest, OccurrenceState.QUEUED, job_id=job.id, missed=missed_count,
                             missed_count_capped=capped, next_occurrence_at=next_at, detail=catch_up)


def _record_missed(session: Session, campaign: RetrainingCampaign, plan: _Plan, clock: datetime) -> None:
    """One ``missed`` row for each of the (bounded) earliest skipped occurrences."""
    detail = f"not run: the dispatcher did not run between this occurrence and {plan.latest.isoformat()}"
    session.execute(
        dialect.insert(session, occurrences)
        .values([{"campaign_id": campaign.id, "occurrence_at": at, "outcome": OccurrenceState.MISSED, "job_id": None,
                  "detail": detail, "recorded_at": clock} for at in plan.missed])
        .on_conflict_do_nothing()
    )
    log_event("campaign.occurrences.missed", logging.WARNING, campaign_id=campaign.id, count=plan.missed_count,
              capped=plan.missed_capped, first=plan.missed[0].isoformat())


def _set_outcome(session: Session, campaign_id: int, at: datetime, outcome: str, job_id, detail: str) -> None:
    session.execute(
        update(occurrences)
        .where(occurrences.c.campaign_id == campaign_id, occurrences.c.occurrence_at == at)
        .values(outcome=outcome, job_id=job_id, detail=detail[:2000])
    )


def _why_not_runnable(session: Session, campaign: RetrainingCampaign) -> str | None:
    """Why this occurrence may not reset anything now, or None.

    The campaign was confirmed once; each occurrence still acts in its
    creator's name, so it needs the course in the same organization and the
    creator still holding ``training.manage``.
    """
    course = session.get(Course, campaign.course_id)
    if course is None or course.organization_id != campaign.organization_id:
        return f"course {campaign.course_id} no longer exists"
    creator = session.get(User, campaign.created_by)
    if creator is None or creator.organization_id != campaign.organization_id:
        return f"the campaign's creator, actor {campaign.created_by}, no longer exists"
    if not creator.has_permission(PERMISSION_TRAINING):
        return (f"the campaign's creator, actor {campaign.created_by}, no longer holds {PERMISSION_TRAINING}; "
                "delete the campaign and create it again under an administrator who does")
    return None
