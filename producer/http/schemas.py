"""The request and response bodies of the HTTP API, as pydantic models.

They are the contract other services code against: the OpenAPI document's
component schemas are generated from these classes and named after them, so a
class is renamed only together with ``docs/openapi.json``. Request bodies
(``*In``) refuse unknown fields and do not coerce types; response bodies allow
extra fields, so a service function can add one without breaking the API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from models.job_events import EVENT_TYPES
from producer import campaigns, webhooks
from producer.access import MAX_REASON

MAX_ID = 2**31 - 1

Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class _Body(BaseModel):
    # Unknown fields are refused (a typo must not silently reset a whole course),
    # and types are not coerced ("7" is not an id).
    model_config = ConfigDict(extra="forbid", strict=True)


class ResetRequestIn(_Body):
    actor_id: Id = Field(description="The acting admin; must belong to the API key's organization.")
    course_id: Id
    learner_id: Id | None = Field(default=None, description="Reset one learner; omit to reset the whole course.")
    reason: str = Field(default="", max_length=MAX_REASON)


class ConfirmIn(_Body):
    actor_id: Id = Field(description="The actor who made the request.")
    token: str = Field(min_length=1, max_length=200, description="The one-time token the request returned.")


class ActorIn(_Body):
    actor_id: Id


class CampaignRequestIn(_Body):
    actor_id: Id
    course_id: Id
    cron: str | None = Field(default=None, max_length=120,
                             description="Five-field cron expression in the campaign's time zone.")
    every_months: int | None = Field(default=None, ge=1, le=120, description="Repeat every N months from start.")
    start: str | None = Field(default=None, max_length=64,
                              description="First occurrence of a months schedule: a date, a local date-time "
                                          "or an instant with an offset.")
    time_zone: str | None = Field(default=None, max_length=64, description="IANA zone; default: the organization's.")
    completed_before_days: int | None = Field(default=None, ge=1, le=campaigns.MAX_AUDIENCE_DAYS)
    reason: str = Field(default="", max_length=MAX_REASON)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Summary(_Out):
    learners: int = Field(description="Learners who will be reset (those with progress).")
    completions: int
    certificates: int
    learners_to_notify: int


class ResetSummary(Summary):
    course_id: int
    course_title: str = Field(description="The course's title, to recognise it before confirming.")
    learner_id: int | None = Field(description="The learner of a one-learner reset; null for a whole course.")
    learner_name: str | None = Field(description="That learner's name; null for a whole course.")
    assigned_learners: int = Field(description="Learners assigned to the course.")
    learners_keeping_state: int = Field(description="Assigned learners this reset leaves as they are.")
    irreversible: bool = Field(description="Always true: cleared progress, completions and certificates are "
                                           "deleted, not hidden.")
    description: str = Field(description="One sentence saying all of the above, for a confirmation dialog.")


class ResetRequestOut(_Out):
    request_id: str
    token: str | None = Field(description="One-time confirmation token; a replay (same Idempotency-Key and body) "
                                          "returns the same one, or null once the request is no longer awaiting "
                                          "confirmation.")
    expires_at: datetime | None
    summary: ResetSummary
    state: str
    replayed: bool = Field(description="True when this is the answer to an earlier request with the same "
                                       "Idempotency-Key (also the header `Idempotent-Replayed: true`); nothing "
                                       "was changed.")


class ConfirmOut(_Out):
    job_id: str
    state: str


class NotificationCounts(_Out):
    pending: int
    sent: int
    failed: int


class StatusOut(_Out):
    job_id: str
    state: str
    scope: str
    course_id: int
    learner_id: int | None
    learners_total: int
    learners_done: int
    batches_total: int
    batches_done: int
    batches_dead: int
    cleared: dict[str, int]
    notifications: NotificationCounts
    started_at: str | None
    finished_at: str | None
    error: str | None
    trace_id: str | None = Field(description="The job's OpenTelemetry trace id (32 hex digits): the trace of the "
                                             "request that confirmed it; null when tracing was off.")


class JobOut(_Out):
    job_id: str
    state: str
    scope: str
    course_id: int
    learner_id: int | None
    campaign_id: int | None
    actor_id: int
    origin: str
    reason: str
    learners_total: int
    learners_done: int
    cleared: dict[str, int]
    created_at: str | None
    confirmed_at: str | None
    finished_at: str | None
    error: str | None


class JobPage(_Out):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class AuditEventOut(_Out):
    id: int
    created_at: str
    action: str = Field(description="e.g. reset.requested, reset.confirmed, reset.succeeded, campaign.confirmed")
    organization_id: int
    actor_id: int | None
    course_id: int | None
    learner_id: int | None
    job_id: str | None
    campaign_id: int | None
    learner_count: int | None
    reason: str
    origin: str
    details: dict[str, Any]


class AuditPage(_Out):
    items: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class WebhookIn(_Body):
    url: str = Field(min_length=1, max_length=2000,
                     description="https URL of the receiver (public address). Plain http only to loopback, and only "
                                 "when WEBHOOKS_ALLOW_HTTP_LOOPBACK=true.")
    events: list[str] = Field(min_length=1, max_length=len(EVENT_TYPES),
                              description="Any of: " + ", ".join(EVENT_TYPES))


class RotateSecretIn(_Body):
    overlap_seconds: int = Field(default=webhooks.DEFAULT_OVERLAP_SECONDS, ge=0, le=webhooks.MAX_OVERLAP_SECONDS,
                                 description="How long the old secret keeps signing too (a second `v1`).")


class WebhookOut(_Out):
    id: int
    organization_id: int
    url: str
    events: list[str]
    created_at: str
    deleted_at: str | None
    previous_secret_expires_at: str | None = Field(description="While a rotation overlaps: when the old secret "
                                                               "stops signing.")


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(description="Signing secret, shown only in this response: keep it.")


class WebhookListOut(_Out):
    items: list[WebhookOut]


class DeliveryOut(_Out):
    delivery_id: int
    event_id: str
    event_type: str
    job_id: str | None
    status: str = Field(description="pending, sending, delivered, failed or cancelled")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    last_attempt_at: str | None
    delivered_at: str | None
    created_at: str


class DeliveryPage(_Out):
    items: list[DeliveryOut]
    next_cursor: str | None


class JobEventCounts(BaseModel):
    pending: int
    sent: int
    failed: int


class JobEventData(BaseModel):
    """The job at the moment of the event, in the shape of `GET /v1/resets/{job_id}`, plus who acted, why and
    from where: ids and counts only, never cleared data or personal data."""

    job_id: str
    state: str
    scope: str = Field(description="course or learner")
    course_id: int
    learner_id: int | None
    campaign_id: int | None
    actor_id: int = Field(description="Who confirmed (or cancelled) the reset.")
    reason: str
    origin: str = Field(description="cli, campaign, http:<API key name>, python")
    learners_total: int
    learners_done: int
    batches_total: int
    batches_done: int
    batches_dead: int
    learner_batches_total: int
    purge_batches_total: int
    purge_batches_done: int
    cleared: dict[str, int] = Field(description="Rows cleared per component (lesson_progress, certificates, ...).")
    notifications: JobEventCounts
    created_at: str | None
    confirmed_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None


class JobEvent(BaseModel):
    """The body of every webhook delivery. Headers: `X-Event-Id` (= `id`, for deduplication), `X-Event-Type`,
    `X-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` (one `v1` per secret in use), `X-Delivery-Attempt`."""

    id: str = Field(description="Event id: the same on every attempt and redelivery.")
    type: str = Field(description=", ".join(EVENT_TYPES))
    created_at: str
    organization_id: int
    data: JobEventData


class CampaignRequestOut(_Out):
    campaign_id: int
    token: str
    expires_at: datetime
    summary: Summary
    schedule: str
    time_zone: str
    first_occurrences: list[datetime]
    state: str


class CampaignOut(_Out):
    campaign_id: int
    course_id: int
    state: str
    schedule: str
    next_occurrence_at: str | None


class CampaignListOut(_Out):
    campaigns: list[CampaignOut]
