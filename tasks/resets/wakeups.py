"""Wake-ups: the ``resets.work`` messages that make a worker look for the unit whose turn it is.

A message is a wake-up, not an assignment (decision record 0005): whichever unit is next in turn
runs, so a long queue of one organization's messages never stands in front of another's work.
A wake-up that finds nothing to do ends without publishing, so surplus ones die out; one that
ran a unit publishes one more, so the work never lacks a wake-up while units remain.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from models.messaging import publish_after_commit, send_now
from models.settings import get_settings

WORK_TASK = "resets.work"
FINALIZE_TASK = "resets.finalize"
# How soon a wake-up that found only locked units looks again (a dead worker's transaction is
# rolled back as soon as PostgreSQL notices the closed connection: well under a second).
LOCKED_UNIT_RETRY_SECONDS = 0.5


def wake_workers(session: Session, units: int) -> None:
    """After commit, publish up to ``RESET_WORK_TOKENS`` wake-ups for ``units`` new runnable units."""
    for _ in range(max(0, min(units, get_settings().work_tokens))):
        publish_after_commit(session, WORK_TASK, [])


def hand_on_turn(countdown: float | None = None) -> None:
    """Publish one wake-up now (the caller's unit has committed), or after ``countdown`` seconds."""
    send_now(WORK_TASK, [], **({"countdown": countdown} if countdown else {}))


def publish_follow_ups(session: Session, job_id: str, finalize: bool, released_purge: int) -> None:
    """After commit: wake-ups for the purge batches the learner phase released, or the finalize."""
    wake_workers(session, released_purge)
    if finalize:
        publish_after_commit(session, FINALIZE_TASK, [job_id])
