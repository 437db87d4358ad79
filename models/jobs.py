"""The reset-job ledger: who a reset targets, what it would clear, one active reset per course,
activation of a confirmed job, and finding a job by id.

Shared by the producer (requests and confirms), the campaign dispatcher and the
reset tasks, so the rules exist once. Functions take a ``Session`` and never
commit. The job's status shape is :mod:`models.job_status`; the audit trail is
written by :mod:`models.audit`; confirmation tokens are :mod:`models.tokens`.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from models.dialect import LockSpace, hold_transaction_lock
from models.errors import Conflict, NotFound
from models.job_ids import job_uuid
from models.schema import Certificate, CourseAssignment, CourseCompletion, ResetJob, User
from models.states import ACTIVE_JOB_STATES, AssignmentStatus, JobScope, JobState
from models.times import utcnow
from models.tracing import current_traceparent


# --- who a reset targets --------------------------------------------------------------

def target_filter(
    course_id: int, learner_id: int | None = None, completed_before: datetime | None = None
) -> ColumnElement[bool]:
    """The learners a reset applies to: assigned, with progress (R6), within the audience.

    One definition for the request summary, batch planning and the batches.
    """
    a = CourseAssignment.__table__.c
    clauses = [a.course_id == course_id, a.status != AssignmentStatus.NOT_STARTED]
    if learner_id is not None:
        clauses.append(a.user_id == learner_id)
    if completed_before is not None:
        clauses.extend([a.status == AssignmentStatus.COMPLETED, a.completed_at < completed_before])
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

    The partial unique indexes over active jobs decide same-scope races; a lock on the
    course serialises a learner reset against a course-wide one (an advisory lock, not a row
    lock: the application only reads courses).
    Raises :class:`Conflict` naming the active job. Does not commit.
    """
    now = now or utcnow()
    hold_transaction_lock(session, LockSpace.COURSE_ACTIVATION, job.course_id)
    blocking = find_active_job(session, job.course_id, job.learner_id if job.scope == JobScope.LEARNER else None)
    if blocking is not None and blocking.id != job.id:
        raise already_active_error(blocking, job.course_id, job.learner_id)
    try:
        with session.begin_nested():
            job.state = JobState.QUEUED
            job.confirmed_at = now
            job.published_at = now
            job.heartbeat_at = now
            # The job's trace: the span confirming it (the caller's request, a campaign's dispatch).
            job.traceparent = current_traceparent() or job.traceparent
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
        key = job_uuid(job_id)
    except ValueError:
        raise NotFound(f"job {job_id} not found") from None
    session.flush()
    job = session.get(ResetJob, key, populate_existing=True)
    if job is None or (organization_id is not None and job.organization_id != organization_id):
        raise NotFound(f"job {job_id} not found")
    return job


def expire_requests(session: Session, now: datetime) -> int:
    """Unconfirmed requests past their token's lifetime become ``expired`` (they never blocked anything);
    nothing that could open their token is kept."""
    j = ResetJob.__table__
    return session.execute(
        update(j).where(j.c.state == JobState.AWAITING_CONFIRMATION, j.c.token_expires_at < now)
        .values(state=JobState.EXPIRED, token_hash=None, sealed_token=None)
    ).rowcount or 0
