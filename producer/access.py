"""Who may act on what, and the checks every request of the producer shares.

Resets and campaigns are requested and confirmed the same way: an actor of the organization,
a course of that organization, a reason the database can store, and a one-time token that is
checked the same way whatever it confirms. Each rule is written here once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from models.errors import NotFound, TokenExpired, TokenInvalid, ValidationFailed
from models.schema import Course, User
from models.text import check_storable
from models.times import as_utc
from models.tokens import token_matches

MAX_REASON = 2000


def actor_of(session: Session, actor_id: int) -> User:
    """The acting user; an unknown id is not found."""
    actor = session.get(User, actor_id)
    if actor is None:
        raise NotFound(f"actor {actor_id} not found")
    return actor


def course_of(session: Session, actor: User, course_id: int) -> Course:
    """The course, if it belongs to the actor's organization (another organization's is not found)."""
    course = session.get(Course, course_id)
    if course is None or course.organization_id != actor.organization_id:
        raise NotFound(f"course {course_id} not found")
    return course


def checked_reason(reason: str | None) -> str:
    """The reason, stripped, storable and at most ``MAX_REASON`` characters.

    Stripping can bring a formula to the front (``"\\t=1+1"`` is stored as ``=1+1``):
    the CSV export neutralises every cell whatever was stored (:func:`producer.audit.spreadsheet_safe`).
    """
    reason = check_storable("reason", (reason or "").strip())
    if len(reason) > MAX_REASON:
        raise ValidationFailed(f"reason is {len(reason)} characters; at most {MAX_REASON} are allowed")
    return reason


def check_token(what: str, token: str | None, token_hash: str | None, expires_at: datetime, now: datetime,
                again: str) -> None:
    """A confirmation token for ``what`` ("request <id>", "campaign <id>"): right and unexpired.

    The caller has checked that ``what`` still awaits confirmation (a used token's hash is gone).
    ``again`` says what to do after expiry ("make a new request").
    """
    check_storable("token", token)
    if not token_matches(token or "", token_hash):
        raise TokenInvalid(f"wrong confirmation token for {what}")
    if as_utc(expires_at) <= now:
        raise TokenExpired(f"the confirmation token of {what} expired at {as_utc(expires_at).isoformat()}; {again}")
