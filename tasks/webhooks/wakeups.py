"""Waking an endpoint's deliveries when a retry falls due or a lease ends.

One countdown task per endpoint (at most a minute ahead; a longer wait is bridged by
successive wake-ups), claimed through ``wake_at`` on the endpoint row so waiting runs do not
multiply, and a countdown never comes near the broker's visibility timeout.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models.job_events import DELIVER_TASK
from models.messaging import publish_after_commit
from models.states import OPEN_DELIVERY_STATES, DeliveryStatus
from models.times import as_utc
from tasks.webhooks.deliveries import d, e, not_blocked

# The longest countdown a wake-up task uses; a longer wait is bridged by successive wake-ups.
MAX_WAKE_SECONDS = 60.0


def next_wake(session: Session, endpoint_id: int, now: datetime) -> datetime | None:
    """When the endpoint's next open delivery becomes claimable (a retry falls due, a lease ends), if later.

    Deliveries waiting behind an earlier one of their job are left out: they
    are claimed by the run that finishes the earlier one.
    """
    due = session.scalar(
        select(func.min(d.c.next_attempt_at)).where(d.c.endpoint_id == endpoint_id, d.c.status == DeliveryStatus.PENDING,
                                                    d.c.next_attempt_at > now, not_blocked()))
    lease = session.scalar(
        select(func.min(d.c.lease_expires_at)).where(d.c.endpoint_id == endpoint_id, d.c.status == DeliveryStatus.SENDING,
                                                     d.c.lease_expires_at > now))
    times = [as_utc(t) for t in (due, lease) if t is not None]
    return min(times) if times else None


def schedule_wake(session: Session, endpoint_id: int, now: datetime) -> float | None:
    """Publish one countdown task (at most a minute) for the endpoint's next wait, unless one wakes earlier.

    ``wake_at`` on the endpoint is claimed with a conditional UPDATE, so waiting
    runs do not multiply. Returns the countdown, or None (nothing open, or
    another task already wakes earlier).
    """
    at = next_wake(session, endpoint_id, now)
    if at is None:
        return None
    # A longer wait is bridged by a wake-up a minute from now, which looks again (one chain per
    # endpoint): a countdown never comes near the broker's visibility timeout.
    at = min(at, now + timedelta(seconds=MAX_WAKE_SECONDS))
    countdown = max(0.0, (at - now).total_seconds())
    taken = session.execute(
        update(e).where(e.c.id == endpoint_id, e.c.deleted_at.is_(None),
                        or_(e.c.wake_at.is_(None), e.c.wake_at <= now, e.c.wake_at > at))
        .values(wake_at=at)
    ).rowcount
    if taken != 1:
        return None
    d_published = update(d).where(d.c.endpoint_id == endpoint_id, d.c.status.in_(OPEN_DELIVERY_STATES)).values(
        published_at=at)
    session.execute(d_published)
    publish_after_commit(session, DELIVER_TASK, [endpoint_id], countdown=countdown + 0.05)
    return countdown
