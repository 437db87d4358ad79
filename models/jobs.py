"""The reset-job ledger: who is targeted, confirmation tokens, activation and the audit trail.

Shared by the producer (requests and confirms), the campaign dispatcher and the
reset tasks, so the rules exist once. Functions take a ``Session`` and never
commit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import datetime, timezone

from sqlalchemy import and_, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from models.errors import Conflict, NotFound
from models.retention import pruned_notification_counts
from models.webhooks import record_job_event
from models.schema import (
    AuditEvent,
    Certificate,
    Course,
    CourseAssignment,
    CourseCompletion,
    Notification,
    ResetBatch,
    ResetJob,
    User,
)
from models.states import ACTIVE_JOB_STATES, BatchKind, BatchState, JobScope, JobState, NotificationStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored datetime is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


# --- confirmation tokens -------------------------------------------------------------

def new_token() -> tuple[str, str]:
    """A one-time confirmation token and the hash that is stored in its place.

    URL-safe base64 can start with ``-``, which a shell command line reads as an
    option (``--token -x...``); such a draw is discarded, so every token is safe
    to paste. Tokens issued before this rule still confirm: only the hash is compared.
    """
    token = secrets.token_urlsafe(24)
    while token.startswith("-"):
        token = secrets.token_urlsafe(24)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str | None) -> bool:
    return stored_hash is not None and hmac.compare_digest(hash_token(token), stored_hash)


# --- who a reset targets --------------------------------------------------------------

def target_filter(
    course_id: int, learner_id: int | None = None, completed_before: datetime | None = None
) -> ColumnElement[bool]:
    """The learners a reset applies to: assigned, with progress (R6), within the audience.

    One definition for the request summary, batch planning and the batches.
    """
    a = CourseAssignment.__table__.c
    clauses = [a.course_id == course_id, a.status != "not_started"]
    if learner_id is not None:
        clauses.append(a.user_id == learner_id)
    if completed_before is not None:
        clauses.extend([a.status == "completed", a.completed_at < completed_before])
    return and_(*clauses)


def summarize(
    session: Session, course_id: int, learner_id: int | None = None, completed_before: datetime | None = None
) -> dict[str, int]:
    """What a reset would clear: learners, completions, certificates, learners to notify."""
    a = CourseAssignment.__table__.c
    u = User.__table__.c
    targets = select(a.user_id).where(target_filter(course_id, learner_id, completed_before)).subquery()
    learners = session.scalar(select(func.count()).select_from(targets)) or 0
    to_notify = session.scalar(
        select(func.count()).select_from(targets.join(User.__table__, u.id == targets.c.user_id))
        .where(u.notify_course_assigned)
    ) or 0
    completions = session.scalar(
        select(func.count()).select_from(CourseCompletion)
        .where(CourseCompletion.course_id == course_id, CourseCompletion.user_id.in_(select(targets.c.user_id)))
    ) or 0
    certificates = session.scalar(
        select(func.count()).select_from(Certificate)
        .where(Certificate.course_id == course_id, Certificate.user_id.in_(select(targets.c.user_id)))
    ) or 0
    return {"learners": int(learners), "completions": int(completions), "certificates": int(certificates),
            "learners_to_notify": int(to_notify)}


# --- one active reset per course / learner-in-course (R11) ---------------------------------

def find_active_job(session: Session, course_id: int, learner_id: int | None = None) -> ResetJob | None:
    """An active job that blocks a new reset of this course (or learner in it), if any."""
    j = ResetJob
    active = j.state.in_(ACTIVE_JOB_STATES)
    course_wide = session.scalars(
        select(j).where(j.course_id == course_id, j.scope == JobScope.COURSE, active).limit(1)
    ).first()
    if course_wide is not None:
        return course_wide
    query = select(j).where(j.course_id == course_id, j.scope == JobScope.LEARNER, active)
    if learner_id is not None:
        query = query.where(j.learner_id == learner_id)
    return session.scalars(query.limit(1)).first()


def already_active_error(job: ResetJob, course_id: int, learner_id: int | None) -> Conflict:
    target = f"learner {learner_id} in course {course_id}" if learner_id is not None else f"course {course_id}"
    return Conflict(
        f"{target} is already being reset by job {job.id} ({job.state}); wait for it or cancel it"
    )


def activate_job(session: Session, job: ResetJob, now: datetime | None = None) -> ResetJob:
    """Move a confirmed job to ``queued``, refusing if the course or learner already has an active reset.

    The partial unique indexes over active jobs decide same-scope races; the
    course row lock serialises a learner reset against a course-wide one.
    Raises :class:`Conflict` naming the active job. Does not commit.
    """
    now = now or utcnow()
    session.execute(select(Course.id).where(Course.id == job.course_id).with_for_update())
    blocking = find_active_job(session, job.course_id, job.learner_id if job.scope == JobScope.LEARNER else None)
    if blocking is not None and blocking.id != job.id:
        raise already_active_error(blocking, job.course_id, job.learner_id)
    try:
        with session.begin_nested():
            job.state = JobState.QUEUED
            job.confirmed_at = now
            job.published_at = now
            job.heartbeat_at = now
            session.add(job)
            session.flush()
    except IntegrityError:
        blocking = find_active_job(session, job.course_id, job.learner_id)
        if blocking is None:
            raise
        raise already_active_error(blocking, job.course_id, job.learner_id) from None
    return job


def get_job(session: Session, job_id: str | uuid.UUID, organization_id: int | None = None) -> ResetJob:
    """The job by id; jobs of another organization are reported as not found."""
    try:
        key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise NotFound(f"job {job_id} not found") from None
    session.flush()
    job = session.get(ResetJob, key, populate_existing=True)
    if job is None or (organization_id is not None and job.organization_id != organization_id):
        raise NotFound(f"job {job_id} not found")
    return job


def job_identity(job: ResetJob) -> dict:
    """What a job is: its id, state, scope and the ids it concerns (the first keys of every job shape)."""
    return {"job_id": str(job.id), "state": job.state, "scope": job.scope, "course_id": job.course_id,
            "learner_id": job.learner_id, "campaign_id": job.campaign_id}


def describe_status(session: Session, job: ResetJob) -> dict:
    """The job's state and counts in the contract's status shape (docs/rules.md, "Contracts").

    One definition for ``status`` (CLI and HTTP) and the data of webhook events.
    """
    n = Notification.__table__.c
    counts = dict(session.execute(
        select(n.status, func.count()).where(n.reset_job_id == job.id).group_by(n.status)
    ).all())
    pruned = pruned_notification_counts(session, job.id)  # rows retention removed, still counted
    return job_identity(job) | {
        "learners_total": job.learners_total,
        "learners_done": job.learners_done,
        "batches_total": job.batches_total + job.purge_total,
        "batches_done": job.batches_done + job.purge_done - _dead_purges(session, job),
        "batches_dead": job.batches_dead,
        "learner_batches_total": job.batches_total,
        "purge_batches_total": job.purge_total,
        "purge_batches_done": job.purge_done,
        "cleared": dict(job.cleared or {}),
        "notifications": {
            "pending": int(counts.get(NotificationStatus.PENDING, 0) + counts.get(NotificationStatus.SENDING, 0)),
            "sent": int(counts.get(NotificationStatus.SENT, 0)) + pruned[NotificationStatus.SENT],
            "failed": int(counts.get(NotificationStatus.FAILED, 0)) + pruned[NotificationStatus.FAILED],
        },
        "created_at": _iso(job.created_at),
        "confirmed_at": _iso(job.confirmed_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
    }


def _dead_purges(session: Session, job: ResetJob) -> int:
    if not job.batches_dead or not job.purge_total:
        return 0
    b = ResetBatch.__table__
    return session.scalar(select(func.count()).select_from(b).where(
        b.c.job_id == job.id, b.c.kind == BatchKind.PURGE, b.c.state == BatchState.DEAD)) or 0


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


# --- audit ---------------------------------------------------------------------------------

def record_audit(
    session: Session,
    action: str,
    organization_id: int,
    *,
    actor_id: int | None = None,
    course_id: int | None = None,
    learner_id: int | None = None,
    job_id: uuid.UUID | None = None,
    campaign_id: int | None = None,
    learner_count: int | None = None,
    reason: str = "",
    origin: str = "",
    details: dict | None = None,
) -> AuditEvent:
    """Record the fact of an action: never the data it cleared (R5).

    A job's state change (confirmed, succeeded, failed, cancelled) also writes
    its webhook event and deliveries here, in the same transaction
    (:func:`models.webhooks.record_job_event`).
    """
    now = utcnow()
    event = AuditEvent(
        organization_id=organization_id, actor_id=actor_id, action=action, course_id=course_id,
        learner_id=learner_id, job_id=job_id, campaign_id=campaign_id, learner_count=learner_count,
        reason=reason, origin=origin, details=details or {}, created_at=now,
    )
    session.add(event)
    record_job_event(session, action, organization_id, job_id, actor_id, now)
    return event
