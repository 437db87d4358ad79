"""The schema: SQLAlchemy 2 typed declarative models.

Table names and the columns that other services read are part of the contract
(see README "Data model"). Everything a reset touches is reachable by
``(course_id, user_id)`` through an index, so course-wide work never scans other
courses.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models.states import AssignmentStatus, BatchState, CampaignState, DeliveryStatus, JobState, NotificationStatus

# SQLite only auto-increments INTEGER PRIMARY KEY, so big ids are BIGINT on
# PostgreSQL and INTEGER on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

ITEM_KINDS = ("lesson", "practical_assessment", "discussion", "assignment")

PERMISSION_USERS = "platform.users"
PERMISSION_TRAINING = "training.manage"


class Base(DeclarativeBase):
    pass


def _now_default():
    return text("CURRENT_TIMESTAMP")


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    time_zone: Mapped[str] = mapped_column(String(64), default="UTC")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    # Space-separated permission names, e.g. "platform.users training.manage".
    permissions: Mapped[str] = mapped_column(String(400), default="")
    notify_course_assigned: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())

    def has_permission(self, permission: str) -> bool:
        return permission in self.permissions.split()


class Course(Base):
    __tablename__ = "courses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    title: Mapped[str] = mapped_column(String(300))
    certificates_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class CourseItem(Base):
    """One piece of course content; ``kind`` says which (lesson, practical assessment, ...)."""

    __tablename__ = "course_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(String(300))
    position: Mapped[int] = mapped_column(Integer)
    required: Mapped[bool] = mapped_column(Boolean, default=True)


class CourseAssignment(Base):
    """A learner assigned to a course: their current attempt's state."""

    __tablename__ = "course_assignments"

    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=AssignmentStatus.NOT_STARTED.value)
    progress_pct: Mapped[float] = mapped_column(Float, default=0.0)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    last_reset_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())

    # A learner's courses (the profile), and a batch's learners in one course:
    # "user_id = ANY(batch) AND course_id = c" is answered by this index alone.
    __table_args__ = (Index("ix_course_assignments_user_course", "user_id", "course_id"),)


class _ProgressRow:
    """Columns shared by every kind of learner progress row.

    ``attempt`` records which attempt the row belongs to; rows are looked up by
    ``(course_id, user_id)`` for resets.
    """

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    course_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(Integer)
    item_id: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


def _progress_indexes(table: str) -> tuple[Index, Index]:
    """Per learner (with ``id`` so "rows newer than X" is answered from the index) and per course in id order.

    The second index lets the purge walk a course's rows in ``id`` order, which is
    insertion (time) order and so roughly physical order: each heap page is
    visited about once, however scattered one learner's rows are.
    """
    return (
        Index(f"ix_{table}_course_user_id", "course_id", "user_id", "id"),
        Index(f"ix_{table}_course_id", "course_id", "id"),
    )


class LessonProgress(_ProgressRow, Base):
    __tablename__ = "lesson_progress"
    __table_args__ = _progress_indexes("lesson_progress")


class AssessmentResult(_ProgressRow, Base):
    __tablename__ = "assessment_results"
    score: Mapped[float] = mapped_column(Float, default=0.0)
    passed: Mapped[bool] = mapped_column(Boolean, default=True)
    __table_args__ = _progress_indexes("assessment_results")


class DiscussionPost(_ProgressRow, Base):
    __tablename__ = "discussion_posts"
    body: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = _progress_indexes("discussion_posts")


class AssignmentSubmission(_ProgressRow, Base):
    __tablename__ = "assignment_submissions"
    grade: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = _progress_indexes("assignment_submissions")


class CourseCompletion(Base):
    __tablename__ = "course_completions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    course_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=AssignmentStatus.COMPLETED.value)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_pct: Mapped[float] = mapped_column(Float, default=100.0)
    completed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("course_id", "user_id", "attempt", name="uq_course_completions_attempt"),
        Index("ix_course_completions_course_id", "course_id", "id"),
    )


class Certificate(Base):
    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    course_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    number: Mapped[str] = mapped_column(String(64), unique=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("course_id", "user_id", "attempt", name="uq_certificates_attempt"),
        Index("ix_certificates_course_id", "course_id", "id"),
    )


class CourseAnalytics(Base):
    """Per-course aggregates, kept exact at every commit."""

    __tablename__ = "course_analytics"

    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"), primary_key=True)
    assigned: Mapped[int] = mapped_column(Integer, default=0)
    not_started: Mapped[int] = mapped_column(Integer, default=0)
    in_progress: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    completion_rate: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class ResetJob(Base):
    """The ledger of reset requests and jobs; a request becomes a job on confirm."""

    __tablename__ = "reset_jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    organization_id: Mapped[int] = mapped_column(Integer)
    course_id: Mapped[int] = mapped_column(Integer)
    learner_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    scope: Mapped[str] = mapped_column(String(16))  # "course" | "learner"
    state: Mapped[str] = mapped_column(String(32), default=JobState.AWAITING_CONFIRMATION)
    actor_id: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    origin: Mapped[str] = mapped_column(String(64), default="python")
    campaign_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    occurrence_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Audience filter: only learners whose completion is older than this.
    completed_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # An idempotency key is never stored: only a digest to find the request again, and the
    # token sealed under the key, so a replay can answer with it (producer/idempotency.py).
    idempotency_key_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sealed_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    params_hash: Mapped[str] = mapped_column(String(64), default="")
    token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    learners_total: Mapped[int] = mapped_column(Integer, default=0)
    learners_done: Mapped[int] = mapped_column(Integer, default=0)
    batches_total: Mapped[int] = mapped_column(Integer, default=0)
    batches_done: Mapped[int] = mapped_column(Integer, default=0)
    batches_dead: Mapped[int] = mapped_column(Integer, default=0)
    cleared: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancelled_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Deferred purge (course-wide jobs): per component table, the highest row id
    # when the job started. Rows at or below it predate the job; the learner
    # batches clear newer rows and the purge clears these in id order.
    watermarks: Mapped[dict] = mapped_column(JSON, default=dict)
    purge_total: Mapped[int] = mapped_column(Integer, default=0)
    purge_done: Mapped[int] = mapped_column(Integer, default=0)
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When the job's next ``notifications.send`` is due: one chain of sends per job (tasks/notifications).
    notify_wake_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The W3C traceparent of the span that confirmed the job (null when tracing was off): every
    # unit, the finalize and the job's notifications and webhook deliveries join that trace.
    traceparent: Mapped[str | None] = mapped_column(String(55), nullable=True)

    __table_args__ = (
        # R11: at most one active reset per course and per learner-in-course,
        # enforced by the database rather than by a check-then-insert.
        Index(
            "uq_reset_jobs_active_course",
            "course_id",
            unique=True,
            postgresql_where=text("scope = 'course' AND state IN ('queued', 'running', 'cancelling')"),
            sqlite_where=text("scope = 'course' AND state IN ('queued', 'running', 'cancelling')"),
        ),
        Index(
            "uq_reset_jobs_active_learner",
            "course_id",
            "learner_id",
            unique=True,
            postgresql_where=text("scope = 'learner' AND state IN ('queued', 'running', 'cancelling')"),
            sqlite_where=text("scope = 'learner' AND state IN ('queued', 'running', 'cancelling')"),
        ),
        Index(
            "uq_reset_jobs_idempotency",
            "actor_id",
            "idempotency_key_hash",
            unique=True,
            postgresql_where=text("idempotency_key_hash IS NOT NULL"),
            sqlite_where=text("idempotency_key_hash IS NOT NULL"),
        ),
        Index("ix_reset_jobs_course_state", "course_id", "state"),
        Index("ix_reset_jobs_state_created", "state", "created_at"),
        # Listing jobs newest first (GET /v1/resets): one index range per page, whatever the filter.
        Index("ix_reset_jobs_org_created", "organization_id", "created_at", "id"),
        Index("ix_reset_jobs_org_state_created", "organization_id", "state", "created_at", "id"),
        Index("ix_reset_jobs_course_created", "course_id", "created_at", "id"),
        Index("ix_reset_jobs_learner_created", "learner_id", "created_at", "id",
              postgresql_where=text("learner_id IS NOT NULL"), sqlite_where=text("learner_id IS NOT NULL")),
        Index("ix_reset_jobs_campaign_created", "campaign_id", "created_at", "id",
              postgresql_where=text("campaign_id IS NOT NULL"), sqlite_where=text("campaign_id IS NOT NULL")),
        # Retention: finished jobs, oldest first.
        Index("ix_reset_jobs_finished_created", "created_at",
              postgresql_where=text("state IN ('succeeded', 'failed', 'cancelled', 'expired')"),
              sqlite_where=text("state IN ('succeeded', 'failed', 'cancelled', 'expired')")),
        UniqueConstraint("campaign_id", "occurrence_at", name="uq_reset_jobs_campaign_occurrence"),
    )


class OrganizationTurn(Base):
    """Whose turn it is: when an organization last had a unit of reset work claimed, and for which job.

    Organizations take turns oldest first; within one, jobs take turns in
    ``(created_at, id)`` order after the last one served. Only the fair
    picker in ``tasks/reset_steps/turns.py`` writes here (decision record 0005), so
    claiming a unit never locks a ``reset_jobs`` row.
    """

    __tablename__ = "organization_turns"

    organization_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    job_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)


class ResetBatch(Base):
    """One batch of a job.

    ``kind = "learners"``: a keyset range of learner ids ``(lo_user_id, hi_user_id]``.
    ``kind = "purge"``: one component's pre-job rows of the course, cleared in
    id order from ``cursor_row_id`` up to ``hi_row_id`` (the job's watermark).
    """

    __tablename__ = "reset_batches"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("reset_jobs.id"), primary_key=True)
    batch_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="learners")
    component: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cursor_row_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    hi_row_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lo_user_id: Mapped[int] = mapped_column(Integer)
    hi_user_id: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=BatchState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The ``resets.work`` message that claimed the batch: redelivered after its worker died, it
    # takes the same batch back at once instead of waiting for the lease (decision record 0005).
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    learners_reset: Mapped[int] = mapped_column(Integer, default=0)
    cleared: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_reset_batches_state", "state", "lease_expires_at"),
        # Retention: finished batches, oldest first.
        Index("ix_reset_batches_finished", "finished_at", postgresql_where=text("state IN ('done', 'cancelled')"),
              sqlite_where=text("state IN ('done', 'cancelled')")),
    )


class Notification(Base):
    """Outbox row: one notification to send, written in the reset's transaction."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Integer)
    course_id: Mapped[int] = mapped_column(Integer)
    reset_job_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(32), default="course_assigned")
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The token of the claim that owns the row while it is ``sending`` (every write checks it).
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    provider_id: Mapped[str | None] = mapped_column(String(300), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())

    __table_args__ = (
        UniqueConstraint("reset_job_id", "user_id", "kind", name="uq_notifications_job_user_kind"),
        Index("ix_notifications_status_next", "status", "next_attempt_at"),
        # The sender claims a job's pending rows in id order: only pending rows are in this
        # index, so a claim never walks past the rows already sent.
        Index("ix_notifications_pending_job", "reset_job_id", "id",
              postgresql_where=text("status = 'pending'"), sqlite_where=text("status = 'pending'")),
        # Retention: sent and failed rows, oldest first.
        Index("ix_notifications_finished_created", "created_at",
              postgresql_where=text("status IN ('sent', 'failed')"), sqlite_where=text("status IN ('sent', 'failed')")),
        # Claims whose lease ran out are taken back per job: only rows being sent are in this index.
        Index("ix_notifications_sending_job", "reset_job_id", "claimed_at",
              postgresql_where=text("status = 'sending'"), sqlite_where=text("status = 'sending'")),
    )


class AuditEvent(Base):
    """The fact of a reset (who, when, which course, which learner or how many, why, from where).

    Never holds the cleared data (R5).
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(Integer, index=True)
    actor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    course_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    learner_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    campaign_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    learner_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    origin: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    # Append-only: triggers of migration 0005 refuse UPDATE, DELETE (and TRUNCATE on PostgreSQL).
    __table_args__ = (
        Index("ix_audit_events_org_created", "organization_id", "created_at", "id"),
        Index("ix_audit_events_course_created", "course_id", "created_at", "id",
              postgresql_where=text("course_id IS NOT NULL"), sqlite_where=text("course_id IS NOT NULL")),
    )


class RetrainingCampaign(Base):
    __tablename__ = "retraining_campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(Integer, index=True)
    course_id: Mapped[int] = mapped_column(Integer)
    # "all_assigned" or "completed_before_days" (with audience_days)
    audience: Mapped[str] = mapped_column(String(32), default="all_assigned")
    audience_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # "cron" (cron_expression in time_zone) or "months" (every_months from start_at)
    schedule_kind: Mapped[str] = mapped_column(String(16))
    cron_expression: Mapped[str | None] = mapped_column(String(120), nullable=True)
    every_months: Mapped[int | None] = mapped_column(Integer, nullable=True)
    start_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    time_zone: Mapped[str] = mapped_column(String(64), default="UTC")
    state: Mapped[str] = mapped_column(String(32), default=CampaignState.AWAITING_CONFIRMATION)
    next_occurrence_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    occurrences_done: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_retraining_campaigns_due", "state", "next_occurrence_at"),)


class CampaignOccurrence(Base):
    """One scheduled instant of a campaign and what became of it.

    The primary key makes each occurrence claimable exactly once.
    """

    __tablename__ = "campaign_occurrences"

    campaign_id: Mapped[int] = mapped_column(ForeignKey("retraining_campaigns.id"), primary_key=True)
    occurrence_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    # queued | skipped_active | missed
    outcome: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A calling service's key, scoped to one organization; only its hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebhookEndpoint(Base):
    """A subscribing service's receiver: where an organization's job events are sent, and which ones.

    ``secret`` signs every delivery, so it is kept (a hash could not sign);
    it is shown to the caller once, at creation and at rotation. During a
    rotation's overlap ``previous_secret`` signs too.
    """

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list] = mapped_column(JSON, default=list)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The earliest instant a delivery task is already scheduled to look at this endpoint again
    # (a short retry or a lease about to expire), so waiting tasks do not multiply.
    wake_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebhookEvent(Base):
    """One job event (``reset.confirmed``, ...), written in the transaction of the state change it reports.

    ``payload`` is the exact body every delivery of it sends: ids and counts only.
    """

    __tablename__ = "webhook_events"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    organization_id: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_webhook_events_org_created", "organization_id", "created_at"),)


class WebhookDelivery(Base):
    """The outbox row of one event for one endpoint, and its delivery log (attempts, last status)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_events.id"))
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
        # The delivery log, newest first, and the claim of an endpoint's next delivery.
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
        # Per-job order: a delivery waits while an earlier one of the same job is unfinished.
        Index("ix_webhook_deliveries_open_job", "endpoint_id", "job_id", "id",
              postgresql_where=text("status IN ('pending', 'sending')"),
              sqlite_where=text("status IN ('pending', 'sending')")),
        # The sweep: what is due or whose lease ran out.
        Index("ix_webhook_deliveries_open_due", "next_attempt_at",
              postgresql_where=text("status IN ('pending', 'sending')"),
              sqlite_where=text("status IN ('pending', 'sending')")),
        # Retention: finished deliveries, oldest first.
        Index("ix_webhook_deliveries_finished_created", "created_at",
              postgresql_where=text("status IN ('delivered', 'failed', 'cancelled')"),
              sqlite_where=text("status IN ('delivered', 'failed', 'cancelled')")),
    )


class PrunedNotifications(Base):
    """How many of a job's notification rows retention removed, by status: its status still counts them.

    A narrow table of its own rather than columns of ``reset_jobs``: a one-learner job's single
    row is pruned on its own, and rewriting the wide job row and its many index entries for each
    would cost more than the row removed.
    """

    __tablename__ = "pruned_notifications"

    reset_job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)


class RetentionTotal(Base):
    """How many rows of one kind retention removed, ever (``notifications_sent``, ``batches_done``, ...).

    The metrics' counters are rows that only move forward; retention removes rows, so each
    counter is read as the rows still there plus these totals and never goes down.
    """

    __tablename__ = "retention_totals"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    rows: Mapped[int] = mapped_column(BigInteger)
