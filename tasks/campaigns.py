"""Retraining campaigns, worker side: the ``campaigns.dispatch_due`` task beat runs every minute.

The work is :func:`models.campaign_dispatch.dispatch_due`, which ``progress-reset campaign
run-due`` also runs; see that module for the guarantees (one job per occurrence, catch-up).
"""

from __future__ import annotations

from models.campaign_dispatch import dispatch_due
from models.db import session_scope
from models.logs import log_event
from models.states import OccurrenceState
from models.times import utcnow
from tasks.base import project_task


@project_task("campaigns.dispatch_due", autoretry_for=())  # beat runs it again at the next tick
def dispatch_due_task() -> int:
    """Beat, every minute: dispatch what is due now. Returns how many jobs were queued."""
    with session_scope() as session:
        result = dispatch_due(session, utcnow())
    if result.outcomes:
        log_event("campaign.dispatch.done", due=len(result.outcomes), queued=result.count(OccurrenceState.QUEUED),
                  skipped=len(result.outcomes) - result.count(OccurrenceState.QUEUED))
    return len(result.job_ids)
