"""Helpers shared by the campaign tests (this module holds no tests).

A small organization built with the domain functions, learners whose
completion date is chosen exactly, and shortcuts for confirmed campaigns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.schema import (
    PERMISSION_TRAINING,
    PERMISSION_USERS,
    AuditEvent,
    CampaignOccurrence,
    CourseItem,
    ResetJob,
    RetrainingCampaign,
)
from models.training import assign_course, create_course, create_organization, create_user, record_activity
from producer import campaigns

ITEMS = [("lesson", "Lesson 1"), ("lesson", "Lesson 2"), ("practical_assessment", "Assessment")]


@dataclass
class Org:
    organization_id: int
    admin_id: int
    plain_user_id: int
    course_ids: list[int]
    learners: dict[str, int] = field(default_factory=dict)


def make_org(session: Session, *, time_zone: str = "UTC", courses: int = 2, name: str = "Org") -> Org:
    """An organization with an admin (both permissions), a user without them, and courses of three items."""
    org = create_organization(session, name, time_zone=time_zone)
    admin = create_user(session, org.id, "Admin", f"admin{org.id}@example.com", (PERMISSION_USERS, PERMISSION_TRAINING))
    plain = create_user(session, org.id, "Plain", f"plain{org.id}@example.com")
    course_ids = [create_course(session, org.id, f"Course {n}", ITEMS).id for n in range(courses)]
    return Org(org.id, admin.id, plain.id, course_ids)


def add_learner(
    session: Session, org: Org, course_id: int, key: str, *, completed_at: datetime | None = None,
    started_at: datetime | None = None, notify: bool = True,
) -> int:
    """A learner assigned to the course: completed at ``completed_at``, in progress from ``started_at``,
    or not started (neither)."""
    user = create_user(session, org.organization_id, key, f"{key}.{org.organization_id}@example.com",
                       notify_course_assigned=notify)
    assign_course(session, course_id, user.id)
    items = session.scalars(select(CourseItem.id).where(CourseItem.course_id == course_id)
                            .order_by(CourseItem.position)).all()
    if completed_at is not None:
        for n, item_id in enumerate(items):
            record_activity(session, course_id, user.id, item_id, at=completed_at - timedelta(hours=len(items) - 1 - n),
                            score=90.0)
    elif started_at is not None:
        record_activity(session, course_id, user.id, items[0], at=started_at)
    org.learners[key] = user.id
    return user.id


def confirmed_campaign(session: Session, org: Org, course_id: int, now: datetime, **kwargs) -> int:
    """Request and confirm a campaign as the org's admin at ``now``; returns its id."""
    kwargs.setdefault("reason", "annual safety refresher")
    req = campaigns.request_campaign(session, org.admin_id, course_id, now=now, **kwargs)
    campaigns.confirm_campaign(session, org.admin_id, req.campaign_id, req.token, now=now)
    return req.campaign_id


def finish_active_jobs(session: Session, at: datetime) -> int:
    """Mark every queued/running job succeeded, standing in for the reset pipeline between occurrences."""
    return session.execute(
        update(ResetJob).where(ResetJob.state.in_(("queued", "running"))).values(state="succeeded", finished_at=at)
    ).rowcount


def campaign_jobs(session: Session, campaign_id: int) -> list[ResetJob]:
    return list(session.scalars(select(ResetJob).where(ResetJob.campaign_id == campaign_id)
                                .order_by(ResetJob.occurrence_at)))


def occurrence_rows(session: Session, campaign_id: int) -> list[CampaignOccurrence]:
    return list(session.scalars(select(CampaignOccurrence).where(CampaignOccurrence.campaign_id == campaign_id)
                                .order_by(CampaignOccurrence.occurrence_at)
                                .execution_options(populate_existing=True)))


def row_counts(session: Session) -> dict[str, int]:
    """Rows of every table a campaign operation may write."""
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
        for model in (RetrainingCampaign, CampaignOccurrence, ResetJob, AuditEvent)
    }
