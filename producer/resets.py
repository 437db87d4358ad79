"""The producer's service functions: request, confirm, cancel, status.

The CLI, the HTTP API and other Python services call these and nothing else, so
the rules (R1-R3, R11, R13) exist once. Each takes a ``Session`` and never
commits; ``confirm`` publishes ``resets.start`` only after the caller's
transaction commits, and the maintenance sweep re-publishes a confirmed job
whose publish failed, so a confirmed job is never lost.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.audit import record_audit
from models.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    NothingToReset,
    PermissionDenied,
    TokenExpired,
    TokenInvalid,
    ValidationFailed,
)
from models.job_status import describe_status, job_identity
from models.jobs import activate_job, already_active_error, find_active_job, get_job, summarize
from models.messaging import publish_after_commit
from models.schema import (
    PERMISSION_TRAINING,
    PERMISSION_USERS,
    Course,
    CourseAssignment,
    ResetJob,
    User,
)
from models.settings import get_settings
from models.states import JobScope, JobState
from models.text import check_storable
from models.times import as_utc, iso, parse_instant, utcnow
from models.tokens import new_token, token_matches
from producer import idempotency
from producer.access import actor_of, check_token, checked_reason, course_of
from producer.pages import Filter, KeysetOrder, fetch_page, filter_values, instant_key, uuid_key

MAX_IDEMPOTENCY_KEY = 200
NEWEST_JOBS_FIRST = KeysetOrder((ResetJob.created_at, ResetJob.id), (instant_key, uuid_key), descending=True)


@dataclass(frozen=True)
class RequestResult:
    request_id: str
    token: str | None
    expires_at: datetime | None
    summary: dict
    state: str
    replayed: bool = False  # the answer to an earlier request with the same idempotency key

    def as_json(self) -> dict:
        return {"request_id": self.request_id, "token": self.token,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None,
                "summary": self.summary, "state": self.state, "replayed": self.replayed}


@dataclass(frozen=True)
class ConfirmResult:
    job_id: str
    state: str

    def as_json(self) -> dict:
        return {"job_id": self.job_id, "state": self.state}




def required_permission(learner_id: int | None) -> str:
    """R2: one learner needs platform.users; a whole course needs training.manage."""
    return PERMISSION_USERS if learner_id is not None else PERMISSION_TRAINING


def _check_permission(actor: User, learner_id: int | None) -> None:
    permission = required_permission(learner_id)
    if not actor.has_permission(permission):
        what = "one learner's progress" if learner_id is not None else "a whole course's progress"
        raise PermissionDenied(f"actor {actor.id} lacks the permission {permission} needed to reset {what}")


def _params_hash(course_id: int, learner_id: int | None, reason: str) -> str:
    blob = json.dumps({"course": course_id, "learner": learner_id, "reason": reason}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def request(
    session: Session,
    actor_id: int,
    course_id: int,
    learner_id: int | None = None,
    reason: str = "",
    idempotency_key: str | None = None,
    origin: str = "python",
    now: datetime | None = None,
) -> RequestResult:
    """Step 1 (R3): validate, summarise what would be cleared, and issue a one-time token.

    The token is stored only as a hash. The same idempotency key with the same
    parameters gets the first answer again, the same token included while the
    request awaits confirmation, marked ``replayed`` and changing nothing; with
    other parameters it is refused (422), and while the first request is still
    in progress too (409; :mod:`producer.idempotency`).
    """
    now = now or utcnow()
    reason = checked_reason(reason)
    check_storable("idempotency key", idempotency_key)
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
        raise ValidationFailed(f"idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    actor = actor_of(session, actor_id)
    course = course_of(session, actor, course_id)
    if learner_id is not None:
        learner = session.get(User, learner_id)
        if learner is None or learner.organization_id != actor.organization_id:
            raise NotFound(f"learner {learner_id} not found")
    _check_permission(actor, learner_id)
    if learner_id is not None and session.get(CourseAssignment, (course_id, learner_id)) is None:
        raise NotFound(f"learner {learner_id} is not assigned to course {course_id}")

    params_hash = _params_hash(course_id, learner_id, reason)
    ttl = timedelta(seconds=get_settings().token_ttl_seconds)
    digest = idempotency.key_digest(idempotency_key) if idempotency_key is not None else None
    if digest is not None:
        idempotency.hold_key(session, actor_id, digest)
        existing = _keyed_request(session, actor_id, digest)
        if existing is not None:
            return _replay(session, existing, params_hash, idempotency_key, now)

    active = find_active_job(session, course_id, learner_id)
    if active is not None:
        raise already_active_error(active, course_id, learner_id)

    summary = summarize(session, course_id, learner_id)
    if summary["learners"] == 0:
        raise nothing_to_reset(session, course, learner_id)
    token, token_hash = new_token()
    job_id = uuid.uuid4()
    job = ResetJob(
        id=job_id, organization_id=actor.organization_id, course_id=course.id, learner_id=learner_id,
        scope=JobScope.LEARNER if learner_id is not None else JobScope.COURSE, state=JobState.AWAITING_CONFIRMATION,
        actor_id=actor_id, reason=reason, origin=origin, idempotency_key_hash=digest,
        sealed_token=idempotency.seal_token(token, idempotency_key, job_id) if digest is not None else None,
        params_hash=params_hash, token_hash=token_hash, token_expires_at=now + ttl, summary=summary,
        created_at=now, learners_total=summary["learners"], cleared={},
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race (SQLite: it waited for it).
        existing = _keyed_request(session, actor_id, digest) if digest is not None else None
        if existing is None:
            raise
        return _replay(session, existing, params_hash, idempotency_key, now)
    record_audit(session, "reset.requested", actor.organization_id, actor_id=actor_id, course_id=course_id,
                 learner_id=learner_id, job_id=job.id, learner_count=summary["learners"], reason=reason,
                 origin=origin)
    return RequestResult(str(job.id), token, job.token_expires_at, present_summary(session, job), job.state)


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 learner``, ``2 learners``, ``0 certificates``."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"


def _learner_label(learner: User | None, learner_id: int) -> str:
    return f"learner {learner_id} ({learner.name})" if learner is not None and learner.name else f"learner {learner_id}"


def nothing_to_reset(session: Session, course: Course, learner_id: int | None) -> NothingToReset:
    if learner_id is not None:
        who = _learner_label(session.get(User, learner_id), learner_id)
        return NothingToReset(f"nothing to reset: {who} has no progress in course {course.id} "
                              f"({course.title!r}); nothing would change")
    return NothingToReset(f"nothing to reset: no learner assigned to course {course.id} ({course.title!r}) "
                          "has progress in it; nothing would change")


def present_summary(session: Session, job: ResetJob) -> dict:
    """The stored summary counts plus what a person needs to recognise the target before confirming.

    The contract's keys (``learners``, ``completions``, ``certificates``,
    ``learners_to_notify``) stay as they are; added: the course title, the
    learner's name (one-learner reset), how many assigned learners keep their
    state, that the reset cannot be undone, and one sentence saying it all.
    Names are shown, never stored in the ledger (it keeps the counts only).
    """
    counts = {k: int(job.summary.get(k, 0)) for k in ("learners", "completions", "certificates",
                                                       "learners_to_notify")}
    course = session.get(Course, job.course_id)
    a = CourseAssignment.__table__.c
    assigned = int(session.scalar(select(func.count()).select_from(CourseAssignment.__table__)
                                  .where(a.course_id == job.course_id)) or 0)
    keeping = max(0, assigned - counts["learners"])
    learner = session.get(User, job.learner_id) if job.learner_id is not None else None
    target = (_learner_label(learner, job.learner_id) if job.learner_id is not None
              else plural(counts["learners"], "learner"))
    sentence = (
        f"Reset course {job.course_id} ({course.title!r}) for {target}: clears "
        f"{plural(counts['completions'], 'completion')} and {plural(counts['certificates'], 'certificate')}"
        f" with all their progress in this course; {plural(counts['learners_to_notify'], 'learner')} will be "
        f"notified; {plural(keeping, 'assigned learner')} keep{'s' if keeping == 1 else ''} their state. "
        "This cannot be undone."
    )
    return counts | {
        "course_id": job.course_id,
        "course_title": course.title,
        "learner_id": job.learner_id,
        "learner_name": learner.name if learner is not None else None,
        "assigned_learners": assigned,
        "learners_keeping_state": keeping,
        "irreversible": True,
        "description": sentence,
    }


def _keyed_request(session: Session, actor_id: int, digest: str) -> ResetJob | None:
    return session.scalars(select(ResetJob).where(ResetJob.actor_id == actor_id,
                                                  ResetJob.idempotency_key_hash == digest)).first()


def _replay(session: Session, existing: ResetJob, params_hash: str, key: str, now: datetime) -> RequestResult:
    """The first answer to the request made with ``key``, marked as a replay; nothing is written.

    Its token (opened from the seal and checked against the stored hash) while
    the request awaits confirmation and the token is valid; once it is
    confirmed, expired or cancelled, the request's state without a token.
    """
    if existing.params_hash != params_hash:
        raise IdempotencyKeyReused(
            f"idempotency key {key!r} was already used for request {existing.id} with other parameters; "
            "use a new key"
        )
    token = None
    if existing.state == JobState.AWAITING_CONFIRMATION and as_utc(existing.token_expires_at) > now:
        token = idempotency.unseal_token(existing.sealed_token, key, existing.id)
        if token is not None and not token_matches(token, existing.token_hash):
            token = None
    return RequestResult(str(existing.id), token, existing.token_expires_at if token else None,
                         present_summary(session, existing), existing.state, replayed=True)


def confirm(
    session: Session, request_id: str, actor_id: int, token: str, now: datetime | None = None
) -> ConfirmResult:
    """Step 2 (R3): the same actor, the right token, in time -> the job is queued and published after commit.

    A wrong, expired or reused token changes nothing. Refused with the active
    job's id if the course or learner is already being reset (R11).
    """
    now = now or utcnow()
    check_storable("token", token)  # refused before any lookup, like every text field
    actor = actor_of(session, actor_id)
    job = get_job(session, request_id, organization_id=actor.organization_id)
    session.refresh(job, with_for_update=True)
    if job.actor_id != actor_id:
        raise PermissionDenied(f"request {job.id} was made by actor {job.actor_id}; only they can confirm it")
    if job.state == JobState.EXPIRED:
        raise TokenExpired(f"request {job.id} expired unconfirmed; make a new request")
    if job.state != JobState.AWAITING_CONFIRMATION:
        raise TokenInvalid(f"request {job.id} was already confirmed (job is {job.state}); a token works once")
    check_token(f"request {job.id}", token, job.token_hash, job.token_expires_at, now, "make a new request")
    _check_permission(actor, job.learner_id)
    activate_job(session, job, now)
    job.token_hash = job.sealed_token = None  # a token works once: nothing is kept to open it again
    record_audit(session, "reset.confirmed", job.organization_id, actor_id=actor_id, course_id=job.course_id,
                 learner_id=job.learner_id, job_id=job.id, learner_count=job.learners_total, reason=job.reason,
                 origin=job.origin)
    publish_after_commit(session, "resets.start", [str(job.id)])
    return ConfirmResult(str(job.id), job.state)


def cancel(session: Session, job_id: str, actor_id: int, now: datetime | None = None) -> dict:
    """Stop a queued or running job. Learners already reset stay reset and are counted.

    A queued job ends ``cancelled`` at once. A running one reads ``cancelling`` until the work in flight has ended: a batch already running
    finishes and counts, none starts, and the clean-up (``resets.finalize``) then clears what
    the purge did not reach, makes the analytics exact, ends the job ``cancelled`` and records
    the ``reset.cancelled`` audit event with the true number of learners reset. Only the job
    row is written here, so a cancel never waits on, or deadlocks with, a batch in flight.
    """
    now = now or utcnow()
    actor = actor_of(session, actor_id)
    job = get_job(session, job_id, organization_id=actor.organization_id)
    _check_permission(actor, job.learner_id)
    jobs = ResetJob.__table__
    # A queued job has done nothing yet: it ends at once (its start message will find it gone).
    if session.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.state == JobState.QUEUED).values(
            state=JobState.CANCELLED, cancelled_by=actor_id, heartbeat_at=now, finished_at=now,
            finalized_at=now)).rowcount == 1:
        action = "reset.cancelled"
    elif session.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.state == JobState.RUNNING).values(
            state=JobState.CANCELLING, cancelled_by=actor_id, heartbeat_at=now)).rowcount == 1:
        action = "reset.cancel_requested"
        publish_after_commit(session, "resets.finalize", [str(job.id)])
    else:
        session.refresh(job)
        raise Conflict(f"job {job.id} is {job.state}; only queued or running jobs can be cancelled")
    session.refresh(job)
    record_audit(session, action, job.organization_id, actor_id=actor_id, course_id=job.course_id,
                 learner_id=job.learner_id, job_id=job.id, learner_count=job.learners_done, reason=job.reason,
                 origin=job.origin)
    return status(session, str(job.id))


def status(session: Session, job_id: str, organization_id: int | None = None) -> dict:
    """The job's state and counts in the contract's JSON shape (docs/rules.md, "Contracts")."""
    return describe_status(session, get_job(session, job_id, organization_id=organization_id))



# --- listing -----------------------------------------------------------------------------------

def describe_job(job) -> dict:
    """One job in a listing: ids, state and counts (no notification counts: see :func:`status`)."""
    return job_identity(job) | {
        "actor_id": job.actor_id,
        "origin": job.origin,
        "reason": job.reason,
        "learners_total": job.learners_total,
        "learners_done": job.learners_done,
        "cleared": job.cleared or {},
        "created_at": iso(job.created_at),
        "confirmed_at": iso(job.confirmed_at),
        "finished_at": iso(job.finished_at),
        "error": job.error,
    }


def list_jobs(
    session: Session,
    organization_id: int,
    *,
    course_id: Filter[int] = None,
    learner_id: Filter[int] = None,
    state: Filter[str] = None,
    origin: Filter[str] = None,
    campaign_id: Filter[int] = None,
    created_after: str | datetime | None = None,
    created_before: str | datetime | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> dict:
    """One page of the organization's jobs, newest first: ``{"items": [...], "next_cursor": str | None}``.

    Keyset pagination on ``(created_at, id)``: each page is one index range scan
    (``ix_reset_jobs_org_created`` and its per-course / per-learner / per-campaign
    / per-state siblings), so a page costs the same however many jobs exist, and
    jobs created between pages never repeat or skip a job. ``created_after`` is
    inclusive, ``created_before`` exclusive. Requests never confirmed are jobs
    too (state ``awaiting_confirmation`` or ``expired``). Each filter but the
    two instants takes one value or a list of them (any of them matches); the
    first indexed one with several values is read one range scan per value.
    """
    states, origins = filter_values("state", state), filter_values("origin", origin)
    for value in states:
        if value not in set(JobState):
            raise ValidationFailed(f"state must be one of {', '.join(JobState)}, got {str(value)[:40]!r}")
    if any(not 0 < len(value) <= 64 for value in origins):
        raise ValidationFailed("origin must be 1 to 64 characters")
    after = parse_instant(created_after, "created_after")
    before = parse_instant(created_before, "created_before")
    j = ResetJob.__table__.c
    query = select(ResetJob).where(j.organization_id == organization_id)
    any_of = None
    for column, values in ((j.course_id, filter_values("course_id", course_id)),
                           (j.learner_id, filter_values("learner_id", learner_id)),
                           (j.campaign_id, filter_values("campaign_id", campaign_id)), (j.state, states),
                           (j.origin, origins)):
        if len(values) > 1 and any_of is None and column is not j.origin:
            any_of = (column, values)
        elif values:
            query = query.where(column.in_(values))
    if after is not None:
        query = query.where(j.created_at >= after)
    if before is not None:
        query = query.where(j.created_at < before)
    page, next_cursor = fetch_page(session, query, NEWEST_JOBS_FIRST, lambda job: (job.created_at, job.id),
                                   limit=limit, cursor=cursor, scalars=True, any_of=any_of)
    return {"items": [describe_job(job) for job in page], "next_cursor": next_cursor}
