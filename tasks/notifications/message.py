"""What a course-assigned notification says, and how a resend of it is recognised.

Kept apart from the backends (:mod:`tasks.notifications.backends`), which only move a rendered
message: the subject, the body, the JSON document and the e-mail headers are made here, from
the outbox row alone, so every backend delivers the same words and every attempt of a row
carries the same identifiers (the SMTP ``Message-ID``, the webhook ``Idempotency-Key``, a
byte-identical webhook body), by which a provider drops the resend after a crash.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.headerregistry import Address
from email.message import EmailMessage

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.schema import Course, User
from models.settings import Settings
from tasks.notifications.outbox import ClaimedNotification

MESSAGE_ID_DOMAIN = "progress-reset"


@dataclass(frozen=True)
class OutgoingMessage:
    """One rendered notification, ready for any backend."""

    notification_id: int
    reset_job_id: str
    user_id: int
    course_id: int
    kind: str
    recipient_name: str
    recipient_email: str
    course_title: str
    course_url: str
    subject: str
    text: str

    @property
    def idempotency_key(self) -> str:
        """Stable across every attempt of this outbox row, unique across databases (job ids are UUIDs)."""
        return f"notification-{self.notification_id}.{self.reset_job_id}"

    @property
    def message_id(self) -> str:
        return f"<{self.idempotency_key}@{MESSAGE_ID_DOMAIN}>"

    def payload(self) -> dict:
        """The JSON document the console and webhook backends deliver (no timestamps: a resend is identical)."""
        return {
            "type": self.kind,
            "notification_id": self.notification_id,
            "idempotency_key": self.idempotency_key,
            "reset_job_id": self.reset_job_id,
            "learner": {"id": self.user_id, "name": self.recipient_name, "email": self.recipient_email},
            "course": {"id": self.course_id, "title": self.course_title, "url": self.course_url},
            "subject": self.subject,
            "text": self.text,
        }


# --- subject and body ---------------------------------------------------------------------------

def course_url(course_id: int, settings: Settings) -> str:
    return f"{settings.course_base_url}/{course_id}"


def render_notification(claim: ClaimedNotification, learner_name: str, learner_email: str, course_title: str,
                        settings: Settings) -> OutgoingMessage:
    """The "course assigned" message for one row: names the learner and the course, links to it."""
    url = course_url(claim.course_id, settings)
    text = (
        f"Hello {learner_name},\n"
        f"\n"
        f"The course \"{course_title}\" has been assigned to you again. Your earlier progress in it\n"
        f"was reset, so you can take it from the start.\n"
        f"\n"
        f"Open the course: {url}\n"
    )
    return OutgoingMessage(
        notification_id=claim.id, reset_job_id=str(claim.reset_job_id), user_id=claim.user_id,
        course_id=claim.course_id, kind=claim.kind, recipient_name=learner_name, recipient_email=learner_email,
        course_title=course_title, course_url=url, subject=f"Course assigned: {course_title}", text=text,
    )


def render_notifications(
    session: Session, claims: list[ClaimedNotification], settings: Settings
) -> tuple[list[tuple[ClaimedNotification, OutgoingMessage]], list[tuple[ClaimedNotification, str]]]:
    """Render a chunk with one query per table. Returns (renderable, unrenderable with the reason why)."""
    if not claims:
        return [], []
    user_ids = {c.user_id for c in claims}
    course_ids = {c.course_id for c in claims}
    users = {row.id: row for row in session.execute(
        select(User.id, User.name, User.email).where(User.id.in_(user_ids)))}
    courses = {row.id: row.title for row in session.execute(
        select(Course.id, Course.title).where(Course.id.in_(course_ids)))}
    ready, broken = [], []
    for claim in claims:
        user = users.get(claim.user_id)
        if user is None:
            broken.append((claim, f"learner {claim.user_id} no longer exists"))
        elif not user.email:
            broken.append((claim, f"learner {claim.user_id} has no e-mail address"))
        elif claim.course_id not in courses:
            broken.append((claim, f"course {claim.course_id} no longer exists"))
        else:
            ready.append((claim, render_notification(claim, user.name, user.email, courses[claim.course_id],
                                                     settings)))
    return ready, broken


# --- e-mail headers -------------------------------------------------------------------------------

# Headers are not folded below the RFC 5322 hard limit, so the Message-ID stays on one
# line and a receiver comparing it byte for byte sees the same value on every resend.
_EMAIL_POLICY = email.policy.SMTP.clone(max_line_length=998)

# Line breaks (CR, LF, and what Unicode also counts as one) and other control characters:
# a header value may not hold them, and a course title or a learner's name can.
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def header_safe(text: str) -> str:
    """``text`` on one line: each run of line breaks or control characters becomes one space.

    A course title with CR/LF between "Forklift" and "safety" gives the subject
    "Course assigned: Forklift safety": the mail still goes out (the email package
    refuses a header value with a line break), and no header can be injected through it.
    """
    return " ".join(_UNSAFE_IN_HEADER.sub(" ", text).split())


def build_email(message: OutgoingMessage, sender: str) -> EmailMessage:
    """The RFC 5322 message; its Message-ID is the same on every attempt. Header values are made one line."""
    mail = EmailMessage(policy=_EMAIL_POLICY)
    mail["From"] = sender
    mail["To"] = Address(display_name=header_safe(message.recipient_name), addr_spec=message.recipient_email)
    mail["Subject"] = header_safe(message.subject)
    mail["Date"] = email.utils.format_datetime(datetime.now(timezone.utc))
    mail["Message-ID"] = message.message_id
    mail["X-Notification-Id"] = str(message.notification_id)
    mail["X-Reset-Job-Id"] = message.reset_job_id
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(message.text)
    return mail
