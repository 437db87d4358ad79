"""A course title (or a learner's name) with CR/LF still gets its SMTP mail out, on one header line.

A real aiosmtpd server on loopback (tests/notify_support.py). The backend test sends straight
through ``SmtpBackend``; the end-to-end test resets a course whose title holds CR/LF with real
worker processes, real PostgreSQL and Redis, and counts what the SMTP server accepted.
"""

from __future__ import annotations

import pytest
from sqlalchemy import update

from models.db import session_scope
from models.schema import Course
from models.seed import seed
from models.settings import Settings
from tasks.notifications.backends import SmtpBackend
from tasks.notifications.message import OutgoingMessage, header_safe
from tests.notify_support import SmtpSink
from tests.test_notifications_e2e import (  # noqa: F401 - setup_env is a fixture
    RESET_QUEUES,
    confirm_course_reset,
    notifiable,
    settled,
    setup_env,
)

TITLE = "Forklift\r\nsafety\nBcc: everyone@example.com\u2028part 2"


def message(title: str, name: str = "Ada Lovelace") -> OutgoingMessage:
    return OutgoingMessage(
        notification_id=9, reset_job_id="3f2b8c1e-0000-4000-8000-000000000009", user_id=109, course_id=3,
        kind="course_assigned", recipient_name=name, recipient_email="ada@example.com", course_title=title,
        course_url="https://t.example/courses/3", subject=f"Course assigned: {title}",
        text=f"Hello {name},\n{title}\nhttps://t.example/courses/3\n")


def test_header_safe_folds_line_breaks_and_controls_to_one_space():
    assert header_safe("Course assigned: " + TITLE) == (
        "Course assigned: Forklift safety Bcc: everyone@example.com part 2")
    assert header_safe("a\x00b\tc\x85d\x7f") == "a b c d"
    assert header_safe("Forklift safety Ü") == "Forklift safety Ü"


def test_crlf_in_course_title_and_learner_name_still_sends_over_smtp():
    with SmtpSink() as sink:
        backend = SmtpBackend(Settings.from_env({}).with_overrides(smtp_port=sink.port))
        try:
            backend.send(message(TITLE, name="Ada\r\nBcc: x@example.com"))
        finally:
            backend.close()
    [delivery] = sink.deliveries
    assert delivery.rcpt == ["ada@example.com"]
    assert delivery.subject == "Course assigned: Forklift safety Bcc: everyone@example.com part 2"
    assert "Bcc" not in delivery.headers and "\n" not in delivery.headers["To"]
    assert "Forklift" in delivery.text  # the body keeps the title as it is


@pytest.mark.e2e
def test_course_title_with_crlf_every_learner_gets_mail_from_real_workers(setup_env, celery_worker_proc):
    sink = SmtpSink().start()
    try:
        env = setup_env(**sink.env())
        with session_scope() as session:
            org = seed(session, learners=60, lessons=2, courses=1, completed_ratio=0.5, random_seed=7)
            course = org.course_ids[0]
            session.execute(update(Course).where(Course.id == course).values(title=TITLE))
        wanted = notifiable(course)
        assert len(wanted) > 10
        celery_worker_proc(env, queues=RESET_QUEUES + ",notifications", concurrency=2, name="crlf")
        job_id = confirm_course_reset(org, course)
        st = settled(job_id, timeout=90)
        assert st["notifications"] == {"pending": 0, "sent": len(wanted), "failed": 0}, st
        per_rcpt = sink.by_recipient()
        assert set(per_rcpt) == {email for _, email in wanted.values()}
        for (delivery,) in per_rcpt.values():
            assert delivery.subject == "Course assigned: Forklift safety Bcc: everyone@example.com part 2"
            assert "Bcc" not in delivery.headers
    finally:
        sink.stop()
