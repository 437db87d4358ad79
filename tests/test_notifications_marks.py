"""Notifications: the one backoff, and sent marks that wait out a database outage.

Recording rows the provider already accepted is the one database-down path the courier's sender
waits out itself: the messages were sent, and only that write says so.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
from sqlalchemy.exc import OperationalError

from tasks.backoff import backoff_seconds
from tasks.base import DATABASE_UNAVAILABLE
from tasks.notifications import outbox, sending
from tasks.notifications import tasks as notification_tasks
from tasks.notifications.outbox import ClaimedNotification


def test_one_backoff_formula_with_equal_jitter():
    rng = random.Random(3)
    for attempt in range(1, 12):
        ceiling = min(5.0, 0.2 * 2 ** (attempt - 1))
        delays = [backoff_seconds(attempt, 0.2, 5.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    # A row's retry delay is the same formula with its own base and cap.
    assert outbox.retry_delay(4, rng=random.Random(9)) == backoff_seconds(4, outbox.RETRY_BASE_SECONDS,
                                                                       outbox.RETRY_MAX_SECONDS, random.Random(9))


def test_the_task_module_registers_the_task_under_its_name():
    assert notification_tasks.send_notifications.name == outbox.TASK_NAME == "notifications.send"
    assert notification_tasks.send_notifications.autoretry_for == DATABASE_UNAVAILABLE


def _claim(nid: int) -> ClaimedNotification:
    return ClaimedNotification(id=nid, user_id=nid, course_id=1, reset_job_id=None, kind="course_assigned",
                               attempts=1, token="t")


@pytest.fixture
def database(monkeypatch):
    """The sender's transactions and marks, faked: ``down`` failures first, then marks are stored."""
    state = {"down": 0, "marked": [], "slept": []}

    @contextmanager
    def transaction():
        yield None

    def mark_sent_many(_session, marks, _now):
        if state["down"]:
            state["down"] -= 1
            raise OperationalError("UPDATE notifications", {}, ConnectionRefusedError("connection refused"))
        state["marked"].extend(marks)
        return len(marks)

    monkeypatch.setattr(sending, "_transaction", transaction)
    monkeypatch.setattr(sending, "mark_sent_many", mark_sent_many)
    monkeypatch.setattr(sending.time, "sleep", state["slept"].append)
    return state


def test_sent_marks_wait_out_a_database_outage_with_the_backoff(database):
    database["down"] = 3
    result = sending.GroupResult(job_id=None)
    marks = sending._SentMarks(result)
    marks.items = [(_claim(1), "p1"), (_claim(2), "p2")]
    marks.flush()
    assert database["marked"] == [(1, "p1"), (2, "p2")] and result.sent == 2
    assert len(database["slept"]) == 3
    for attempt, slept in enumerate(database["slept"], start=1):
        ceiling = min(sending.MARK_RETRY_MAX_SECONDS, sending.MARK_RETRY_BASE_SECONDS * 2 ** (attempt - 1))
        assert ceiling / 2 <= slept <= ceiling


def test_sent_marks_give_up_after_the_deadline(database, monkeypatch):
    monkeypatch.setattr(sending, "MARK_RETRY_SECONDS", 0.0)
    database["down"] = 1
    result = sending.GroupResult(job_id=None)
    marks = sending._SentMarks(result)
    marks.items = [(_claim(1), "p1")]
    with pytest.raises(OperationalError):
        marks.flush()
    assert database["marked"] == [] and result.sent == 0
