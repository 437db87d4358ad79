"""What one ``notifications.send`` message does: line up the job's next group of sends, in milliseconds.

Sending is rate-limited (``NOTIFY_RATE_PER_SECOND``, shared by every worker), and waiting for the
limit must never hold a worker slot. So each job has one *chain* of ``notifications.send``
messages (``reset_jobs.notify_wake_at`` says when its next one is due, and a message that finds
one due later stands aside):

1. a dispatch counts the job's claimable rows (at most one group: the rate of 0.2 s) and reserves
   that many send slots in the shared limiter; the slots may lie in the future, behind other
   jobs' groups;
2. if they do, it publishes itself again, carrying the reservation, with a countdown to them,
   and ends;
3. when the slots are due, it claims the rows (a token of its own, a lease that outlives the
   send's deadline), renders them and hands the group to this process's courier
   (:mod:`tasks.outbound.courier`), which sends it off the pool (:mod:`tasks.notifications.sending`);
4. and it publishes the job's next dispatch, which reserves the next group.

A broker that delivers delayed messages only in whole seconds (RabbitMQ's quorum queues,
``Settings.countdown_step_seconds``) would deliver a dispatch up to a second after its slots,
and a late dispatch must reserve anew: every message would miss its slots. There the countdown
is rounded *down*, slots less than a step away are handed over at once, and the courier's
thread waits out the rest of the second before it sends: off the pool, never before the slots.

Jobs' groups line up in the limiter one after another, so jobs take turns at the shared rate
instead of waking together, and a slow provider slows the courier's threads, never a pool slot.
A chain whose message was lost is started again by the maintenance sweep.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from models.db import session_scope
from models.job_ids import job_uuid
from models.logs import log_event
from models.messaging import publish_after_commit
from models.settings import Settings, get_settings
from models.times import utcnow
from models.tracing import link_jobs
from tasks.notifications.backends import BackendConfigError, make_backend
from tasks.notifications.message import render_notifications
from tasks.notifications.outbox import (
    RETRY_MAX_SECONDS,
    TASK_NAME,
    claim_notifications,
    claim_wake,
    count_claimable,
    mark_failed,
    new_claim_token,
    next_due_at,
    wake_due_at,
)
from tasks.notifications.sending import claim_lease_seconds, send_group
from tasks.outbound.courier import NOTIFICATIONS_LANE, courier_for
from tasks.ratelimit import (
    GROUP_SECONDS,
    RateLimiter,
    RateLimiterUnavailable,
    notification_group_size,
    notification_rate_limiter,
)

# Slots due within this are used at once.
NOW_SECONDS = 0.02
# A dispatch that arrives later than this after its slots (a busy worker) reserves anew: the slots
# it missed are gone, and sending them now would bunch with later groups, past the provider's rate.
LATE_SECONDS = GROUP_SECONDS
# When the rate limiter itself is unreachable, the chain looks again this much later.
LIMITER_DOWN_RETRY_SECONDS = 5.0
# When this process's courier has no room for notifications, the chain looks again this much later.
COURIER_BUSY_RETRY_SECONDS = 0.5


def max_countdown_seconds(settings: Settings) -> float:
    """The longest countdown a dispatch may carry: far below the broker's visibility timeout,
    because Redis delivers an unacknowledged (countdown) message again after it."""
    return min(RETRY_MAX_SECONDS, settings.visibility_timeout_seconds / 10)


@dataclass
class DispatchResult:
    job_id: str | None
    # handed | reserved | idle | waiting | rate_limited | busy | limiter_down | config | bad_arguments
    outcome: str
    claimed: int = 0
    next_in: float | None = None  # seconds until the job's next dispatch, when one was published
    reserved: int = 0  # slots that next dispatch carries


def dispatch_notifications(job_id: str | None = None, reserved: int = 0, slot_at: float | None = None,
                           settings: Settings | None = None, limiter: RateLimiter | None = None) -> DispatchResult:
    """Line up the next group of ``job_id``'s notifications (of any job's with None); see the module.

    ``reserved`` is the number of slots an earlier dispatch of this chain reserved for ``slot_at``
    (Unix seconds); arriving more than ``LATE_SECONDS`` after them, it reserves anew. Never waits:
    safe to run in a worker slot, and any number of times at once (claims are disjoint; a second
    chain of one job stands aside).
    """
    if job_id is not None:
        try:
            job_id = str(job_uuid(job_id))
        except ValueError:  # never matches a row: a message not made by this system
            log_event("notification.bad_task_args", logging.ERROR, job_id=str(job_id)[:64])
            return DispatchResult(None, "bad_arguments")
    settings = settings or get_settings()
    try:
        make_backend(settings).close()
    except BackendConfigError as exc:
        # Nothing is claimed, so the rows wait (pending) until the configuration is fixed.
        log_event("notification.backend_misconfigured", logging.ERROR, job_id=job_id,
                  backend=settings.notify_backend, error=str(exc))
        return DispatchResult(job_id, "config")
    lease = claim_lease_seconds(settings)
    now = utcnow()
    if reserved and slot_at is not None and now.timestamp() - slot_at > LATE_SECONDS:
        log_event("notification.slots_missed", job_id=job_id, slots=reserved,
                  late_seconds=round(now.timestamp() - slot_at, 3))
        reserved = 0
    if not reserved:
        with session_scope() as session:
            due_at = wake_due_at(session, job_id) if job_id is not None else None
            if due_at is not None and due_at > now + timedelta(seconds=NOW_SECONDS):
                return DispatchResult(job_id, "waiting")  # the job's chain is due later: it will go on
            count = count_claimable(session, job_id, notification_group_size(settings), lease, now)
            next_at = None if count else next_due_at(session, job_id, lease)
        if not count:
            return _schedule(job_id, settings, next_at, "idle")
        try:
            reservation = (limiter or notification_rate_limiter(settings)).reserve(
                max_countdown_seconds(settings), count)
        except RateLimiterUnavailable as exc:
            log_event("notification.rate_limiter_unavailable", logging.WARNING, job_id=job_id, error=str(exc))
            return _schedule(job_id, settings, now + timedelta(seconds=LIMITER_DOWN_RETRY_SECONDS), "limiter_down")
        if not reservation.granted:
            return _schedule(job_id, settings, now + timedelta(seconds=reservation.wait), "rate_limited")
        slots = now + timedelta(seconds=reservation.wait)
        step = settings.countdown_step_seconds
        if reservation.wait > max(NOW_SECONDS, step):
            # With a coarse broker the message goes early (whole steps) and the courier waits the rest.
            early = math.floor(reservation.wait / step) * step if step else reservation.wait
            return _schedule(job_id, settings, now + timedelta(seconds=early), "reserved", reserved=count,
                             slot_at=slots)
        reserved, slot_at = count, slots.timestamp()
    return _hand_over(job_id, reserved, settings, lease, not_before=slot_at)


def _hand_over(job_id: str | None, count: int, settings: Settings, lease: float,
               not_before: float | None = None) -> DispatchResult:
    """Claim ``count`` rows whose slots are due (or due in less than the broker's countdown step:
    the courier sends them from ``not_before``, Unix seconds) and give them to the courier; then
    the job's next group."""
    courier = courier_for(settings)
    if not courier.hold(NOTIFICATIONS_LANE):  # the reserved slots go unused: the limit is never passed
        return _schedule(job_id, settings, utcnow() + timedelta(seconds=COURIER_BUSY_RETRY_SECONDS), "busy")
    token = new_claim_token()
    try:
        with session_scope() as session:
            claims = claim_notifications(session, job_id, count, lease, settings.notify_max_attempts,
                                         utcnow(), token)
            link_jobs(session, {claim.reset_job_id for claim in claims})  # this dispatch serves their traces
            lease_ends = time.monotonic() + lease
            ready, broken = render_notifications(session, claims, settings)
            for claim, reason in broken:
                mark_failed(session, claim, reason)
                log_event("notification.failed", logging.WARNING, notification_id=claim.id,
                          job_id=str(claim.reset_job_id), code="unrenderable", attempts=claim.attempts)
    except BaseException:
        courier.release(NOTIFICATIONS_LANE)
        raise
    if ready:
        courier.run_held(("notifications", token), NOTIFICATIONS_LANE,
                         partial(send_group, ready, settings, lease_ends, not_before=not_before))
    else:
        courier.release(NOTIFICATIONS_LANE)
    if claims:
        result = _schedule(job_id, settings, utcnow(), "handed")
    elif job_id is not None:
        # The counted rows were put off (a provider outage) or taken since: follow them, or the
        # chain would end with rows still pending.
        with session_scope() as session:
            next_at = next_due_at(session, job_id, lease)
        result = _schedule(job_id, settings, next_at, "idle")
    else:
        result = DispatchResult(job_id, "idle")
    result.claimed = len(claims)
    return result


def _schedule(job_id: str | None, settings: Settings, at: datetime | None, outcome: str,
              reserved: int = 0, slot_at: datetime | None = None) -> DispatchResult:
    """Publish the job's next dispatch for ``at`` (carrying ``reserved`` slots, due at ``slot_at``,
    by default ``at``), if nothing is due earlier and ``at`` is within a countdown; later work is
    the sweep's to wake."""
    result = DispatchResult(job_id, outcome)
    if at is None:
        return result
    now = utcnow()
    countdown = max(0.0, (at - now).total_seconds())
    if countdown > max_countdown_seconds(settings):
        return result
    with session_scope() as session:
        # A chain's reserved dispatch goes out whatever else is scheduled: its slots are its own.
        if job_id is not None and not claim_wake(session, job_id, at, now) and not reserved:
            return result
        args = [job_id, reserved, round((slot_at or at).timestamp(), 3)] if reserved else [job_id]
        publish_after_commit(session, TASK_NAME, args, **({"countdown": round(countdown, 3)} if countdown else {}))
    result.next_in, result.reserved = round(countdown, 3), reserved
    return result
