"""Publish after commit (models.messaging): what a savepoint's end does to a registered publish."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import models.messaging as messaging
import workers.app  # noqa: F401 - registers the Celery app publishes go through


@pytest.fixture
def sent(monkeypatch):
    out: list[tuple[str, list]] = []
    monkeypatch.setattr(messaging, "send_now", lambda name, args=(), **_options: out.append((name, list(args))))
    return out


def test_a_publish_goes_out_only_when_the_outer_transaction_commits(engine, sent):
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        messaging.publish_after_commit(session, "resets.start", ["a"])
        assert messaging.pending_publishes(session) == [("resets.start", ["a"], {})]
        assert sent == []
        session.commit()
    assert sent == [("resets.start", ["a"])]


def test_a_rolled_back_transaction_publishes_nothing(engine, sent):
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        messaging.publish_after_commit(session, "resets.start", ["a"])
        session.rollback()
        session.commit()
    assert sent == []


def test_a_savepoint_that_rolls_back_drops_its_publishes_and_a_released_one_keeps_them(engine, sent):
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        messaging.publish_after_commit(session, "outer.before", [1])
        with session.begin_nested():  # released
            messaging.publish_after_commit(session, "released", [2])
            nested = session.begin_nested()
            messaging.publish_after_commit(session, "rolled.back.inner", [3])
            nested.rollback()
        assert sent == []  # releasing a savepoint publishes nothing yet
        rolled = session.begin_nested()
        messaging.publish_after_commit(session, "rolled.back", [4])
        with session.begin_nested():  # released inside a savepoint that then rolls back: dropped too
            messaging.publish_after_commit(session, "released.inside.rolled.back", [5])
        rolled.rollback()
        messaging.publish_after_commit(session, "outer.after", [6])
        session.commit()
    assert sent == [("outer.before", [1]), ("released", [2]), ("outer.after", [6])]


def test_publishing_without_an_app_is_refused_before_anything_commits(engine, monkeypatch):
    monkeypatch.setattr(messaging, "_app", None)
    with Session(engine) as session:
        with pytest.raises(RuntimeError, match="import workers.app"):
            messaging.publish_after_commit(session, "resets.start", ["a"])
