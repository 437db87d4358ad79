"""Every state a row can be in, in one place.

The values are the strings stored in the database (``StrEnum`` members compare equal to them),
so a query may use either. A state is spelled here once and referred to by name everywhere else.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """``reset_jobs.state``. A cancelled job is ``cancelling`` until the work in flight has
    ended and its clean-up ran; it still holds its course (or learner-in-course) until then."""

    AWAITING_CONFIRMATION = "awaiting_confirmation"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)
# A job in one of these will never change again (what retention may remove once it is old).
FINISHED_JOB_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED)


class BatchState(StrEnum):
    """``reset_batches.state``: a purge batch ``waiting`` for the learner phase, ``pending``
    (runnable), ``running`` under a lease, then ``done``, ``dead`` (dead-lettered) or ``cancelled``."""

    WAITING = "waiting"
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"
    CANCELLED = "cancelled"


FINISHED_BATCH_STATES = (BatchState.DONE, BatchState.DEAD, BatchState.CANCELLED)
# A batch that may still run: waiting to be claimed, or claimed (its lease says until when).
RUNNABLE_BATCH_STATES = (BatchState.PENDING, BatchState.RUNNING)


class BatchKind(StrEnum):
    """``reset_batches.kind``: a range of learners, or a chunked purge of earlier rows."""

    LEARNERS = "learners"
    PURGE = "purge"


class JobScope(StrEnum):
    """``reset_jobs.scope``: one learner in a course, or every assigned learner of a course."""

    LEARNER = "learner"
    COURSE = "course"


class AssignmentStatus(StrEnum):
    """``course_assignments.status``: a learner's current attempt at a course."""

    NOT_STARTED = "not_started"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class NotificationStatus(StrEnum):
    """``notifications.status``: the outbox of "course assigned" messages."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class CampaignState(StrEnum):
    """``campaigns.state``."""

    AWAITING_CONFIRMATION = "awaiting_confirmation"
    ACTIVE = "active"
    PAUSED = "paused"
    DELETED = "deleted"
    EXPIRED = "expired"


class OccurrenceState(StrEnum):
    """What one due occurrence of a campaign became (``campaign_occurrences.outcome``)."""

    QUEUED = "queued"
    SKIPPED_ACTIVE = "skipped_active"
    SKIPPED_INVALID = "skipped_invalid"
    ALREADY_CLAIMED = "already_claimed"
    MISSED = "missed"
    FAILED = "failed"


class DeliveryStatus(StrEnum):
    """``webhook_deliveries.status``."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_DELIVERY_STATES = (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
