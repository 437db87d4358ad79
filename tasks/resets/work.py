"""Running the unit whose turn it is: what one ``resets.work`` wake-up does.

Claim the next unit in turn (:func:`tasks.resets.turns.claim_next_unit`; the claim commits
before the work starts), run it in its own transaction (a learner batch or one purge chunk),
then hand the turn on with one more wake-up. A unit that raised is backed off
(:mod:`tasks.resets.failures`) and its wake-up comes when the backoff ends. The job's last unit
finalizes it here.
"""

from __future__ import annotations

from enum import StrEnum

from models.db import session_scope
from models.lag_metrics import UNIT_WAIT, observe
from models.settings import get_settings
from models.states import BatchKind
from models.tracing import JobSpan, job_work
from tasks.resets.failures import BatchFailed, defer_failed_unit
from tasks.resets.learner_batch import run_learner_batch
from tasks.resets.outcome import Outcome
from tasks.resets.purge import run_purge_chunk
from tasks.resets.turns import claim_next_unit, runnable_units
from tasks.resets.wakeups import hand_on_turn, publish_follow_ups


# The span of one unit's work in its job's trace.
UNIT_SPAN = "resets.unit"


class UnitRun(StrEnum):
    RAN = "ran"  # a unit ran (or was dead-lettered); the turn was handed on
    IDLE = "idle"  # nothing to do: this wake-up ends, so surplus wake-ups die out
    LOCKED = "locked"  # units wait but their rows are locked: look again shortly
    FAILED = "failed"  # the unit raised and was backed off; its wake-up comes with the backoff


def run_next_unit(owner: str) -> UnitRun:
    """Claim the unit whose turn it is and run it; ``owner`` is the wake-up's message id.

    The same message delivered again (its worker died, or the task is retried) first takes back
    the unit it claimed, so a claimed unit is never left to its lease. The unit runs in a span of
    its job's trace, linked to the wake-up that carried it (models/tracing.py).
    """
    with job_work(UNIT_SPAN) as work:
        return _run_next_unit(owner, work)


def _run_next_unit(owner: str, work: JobSpan) -> UnitRun:
    settings = get_settings()
    with session_scope() as session:
        unit = claim_next_unit(session, settings.batch_max_attempts, settings.batch_lease_seconds, owner=owner)
        if unit is not None:
            work.join(unit.traceparent, job_id=unit.job_id, batch=unit.batch_no, kind=unit.kind)
        if unit is not None and unit.claim.dead:
            publish_follow_ups(session, unit.job_id, unit.claim.job_complete, len(unit.claim.purge))
        # Nothing claimable, yet units are waiting: their rows are locked, typically by the open
        # transaction of a worker killed a moment ago (PostgreSQL rolls it back when it notices).
        # Ending here could leave the job's last units with no wake-up at all.
        locked = unit is None and runnable_units(session, owner=owner) > 0
    if unit is not None and unit.waited_seconds is not None:
        observe(UNIT_WAIT, [(unit.organization_id, unit.waited_seconds)])
    if locked:
        return UnitRun.LOCKED
    if unit is None:
        return UnitRun.IDLE
    if unit.kind == BatchKind.PURGE:
        if run_purge_chunk(unit.job_id, unit.batch_no, finalize_inline=True) == Outcome.FAILED:
            return UnitRun.FAILED
    elif unit.claim.runnable:
        try:
            run_learner_batch(unit.job_id, unit.batch_no, claim=unit.claim, finalize_inline=True)
        except BatchFailed as failed:
            # run_learner_batch recorded the error; the attempt was counted by the claim.
            defer_failed_unit(unit.job_id, unit.batch_no, attempts=failed.attempts)
            return UnitRun.FAILED
    hand_on_turn()
    return UnitRun.RAN
