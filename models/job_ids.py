"""Job ids, one way: every job (and confirmation request) is a UUID; text from outside is parsed here."""

from __future__ import annotations

import uuid


def job_uuid(job_id: str | uuid.UUID) -> uuid.UUID:
    """The job id as a UUID; raises ``ValueError`` when ``job_id`` is not one.

    Callers decide what a malformed id means to them: not found (a status request), a bad
    cursor (a listing), a message to drop (a task argument).
    """
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
