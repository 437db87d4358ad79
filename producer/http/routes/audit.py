"""The audit trail: who requested, confirmed, cancelled or scheduled what, for the key's organization.

Read-only and paginated by cursor, oldest first, so a compliance export can
resume where it stopped without missing or repeating an event.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from models.db import session_scope
from producer import audit
from producer.http.deps import Caller, PageCursor, PageLimit, several
from producer.http.problems import COMMON_ERRORS, problem_responses
from producer.http.schemas import AuditPage, Id

# The list filters of GET /v1/audit: each takes several values (any of them matches).
Actions = several(Annotated[str, Field(min_length=1, max_length=64)], "Events of this action, e.g. reset.confirmed.")
CourseIds = several(Id, "Events of this course.")

router = APIRouter(tags=["audit"])


@router.get("/v1/audit", response_model=AuditPage,
            summary="The key's organization's audit trail, oldest first, with cursor pagination",
            responses=problem_responses(*COMMON_ERRORS))
def list_audit(
    caller: Caller,
    date_from: Annotated[str | None, Query(alias="from", max_length=64, description="ISO-8601, inclusive")
                         ] = None,
    date_to: Annotated[str | None, Query(alias="to", max_length=64, description="ISO-8601, exclusive")] = None,
    action: Actions = None,
    course_id: CourseIds = None,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
) -> dict:
    with session_scope() as session:
        return audit.list_events(session, caller.organization_id, date_from=date_from, date_to=date_to,
                                 action=action, course_id=course_id, limit=limit, cursor=cursor)
