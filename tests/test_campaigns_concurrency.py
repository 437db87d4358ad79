"""Exactly one job per occurrence: concurrent dispatchers, a dispatcher dying half-way, the task wiring.

These tests commit, so each gets its own database from ``fresh_db()``.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import models.messaging
from models import campaign_dispatch as dispatcher
from models.campaign_dispatch import dispatch_due
from models.db import make_engine
from models.schema import CampaignOccurrence, ResetJob
from models.times import utcnow
from tests.test_campaigns_support import confirmed_campaign, finish_active_jobs, make_org

UTC = timezone.utc
CREATED = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)
COURSES = 40
SHARED = 10  # extra campaigns on the last courses, which already have one


@pytest.fixture
def published(monkeypatch):
    """Every task published after commit, as (name, args), instead of going to a broker."""
    sent: list[tuple[str, list]] = []
    lock = threading.Lock()

    def record(task_name, args=(), **_options):
        with lock:
            sent.append((task_name, list(args)))
        return True

    monkeypatch.setattr(models.messaging, "send_now", record)
    return sent


@pytest.fixture
def campaign_db(fresh_db):
    """A committed organization with ``COURSES`` courses and ``COURSES + SHARED`` daily 09:00 UTC campaigns."""
    engine = make_engine(fresh_db())
    with Session(engine) as session, session.begin():
        org = make_org(session, courses=COURSES)
        ids = [confirmed_campaign(session, org, course, CREATED, cron="0 9 * * *", time_zone="UTC")
               for course in org.course_ids + org.course_ids[-SHARED:]]
    yield engine, ids
    engine.dispose()


def run_dispatchers(engine, at: datetime, count: int = 2):
    """Start ``count`` dispatchers together (barrier), each on its own connection and transaction."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def run(n: int) -> None:
        try:
            with Session(engine) as session, session.begin():
                session.connection()  # connect before the barrier, so the race is the dispatch itself
                barrier.wait(timeout=30)
                results[n] = dispatch_due(session, at)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_concurrent_dispatchers_create_exactly_one_job_per_occurrence(campaign_db, published, monkeypatch):
    engine, campaign_ids = campaign_db
    # Small chunks, so the two dispatchers interleave and split the campaigns between them.
    monkeypatch.setattr(dispatcher, "CLAIM_CHUNK", 3)
    split = []
    for day in (6, 7, 8):
        occurrence = datetime(2025, 3, day, 9, 0, tzinfo=UTC)
        at = occurrence + timedelta(seconds=30)
        first, second = run_dispatchers(engine, at)
        split.append((len(first.outcomes), len(second.outcomes)))
        outcomes = first.outcomes + second.outcomes
        # Every due campaign handled once, by one of the two.
        assert sorted(o.campaign_id for o in outcomes) == sorted(campaign_ids)
        assert {o.occurrence_at for o in outcomes} == {occurrence}
        assert sorted(o.outcome for o in outcomes) == ["queued"] * COURSES + ["skipped_active"] * SHARED
        # A replayed tick from both, at the same instant: nothing more.
        again = run_dispatchers(engine, at)
        assert again[0].outcomes == again[1].outcomes == []

        with Session(engine) as session:
            jobs = session.scalars(select(ResetJob).where(ResetJob.occurrence_at == occurrence)).all()
            assert len(jobs) == COURSES
            assert len({j.course_id for j in jobs}) == COURSES  # one per course
            assert len({j.campaign_id for j in jobs}) == COURSES
            assert {j.state for j in jobs} == {"queued"}
            rows = session.execute(
                select(CampaignOccurrence.outcome, func.count()).where(CampaignOccurrence.occurrence_at == occurrence)
                .group_by(CampaignOccurrence.outcome)).all()
            assert dict(rows) == {"queued": COURSES, "skipped_active": SHARED}
            # Each job's start was published once, after its transaction committed.
            assert sorted(args[0] for name, args in published if name == "resets.start"
                          and args[0] in {str(j.id) for j in jobs}) == sorted(str(j.id) for j in jobs)
        with Session(engine) as session, session.begin():
            finish_active_jobs(session, at)

    with Session(engine) as session:
        # The first round caught up over two missed days per campaign; recorded once each.
        missed = session.scalar(select(func.count()).select_from(CampaignOccurrence)
                                .where(CampaignOccurrence.outcome == "missed"))
        assert missed == 2 * len(campaign_ids)
        total_jobs = session.scalar(select(func.count()).select_from(ResetJob))
        assert total_jobs == 3 * COURSES
    assert len(published) == 3 * COURSES
    # Both took part: the campaigns were split between two overlapping transactions.
    assert any(a and b for a, b in split), split
    print(f"campaigns handled by each dispatcher, per round: {split}")


def test_a_dispatcher_dying_half_way_leaves_nothing_and_the_next_tick_does_everything(
        campaign_db, published, monkeypatch):
    engine, campaign_ids = campaign_db
    at = datetime(2025, 3, 4, 9, 0, 5, tzinfo=UTC)
    real_activate = dispatcher.activate_job
    calls = {"n": 0}

    def dies_on_the_seventh(session, job, now=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise SystemExit("worker killed")  # not an error the dispatcher handles: the transaction dies
        return real_activate(session, job, now)

    monkeypatch.setattr(dispatcher, "activate_job", dies_on_the_seventh)
    with pytest.raises(SystemExit):
        with Session(engine) as session, session.begin():
            dispatch_due(session, at)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(ResetJob)) == 0
        assert session.scalar(select(func.count()).select_from(CampaignOccurrence)) == 0
    assert published == []

    monkeypatch.setattr(dispatcher, "activate_job", real_activate)
    [result] = run_dispatchers(engine, at, count=1)
    assert result.count("queued") == COURSES and result.count("skipped_active") == SHARED
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(ResetJob)) == COURSES
    assert len(published) == COURSES


def test_the_beat_task_dispatches_and_publishes_after_commit(fresh_db, use_env, published):
    import tasks.campaigns  # registers the beat task on the app
    from models.settings import get_settings
    from workers.app import app
    from workers.config import celery_config

    url = fresh_db()
    use_env(DATABASE_URL=url, CAMPAIGN_MIN_INTERVAL_SECONDS="600")  # occurrences every 10 minutes
    now = utcnow()
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        org = make_org(session, courses=1)
        campaign_id = confirmed_campaign(session, org, org.course_ids[0], now - timedelta(hours=2),
                                         cron="*/10 * * * *", time_zone="UTC")

    task = app.tasks["campaigns.dispatch_due"]
    assert tasks.campaigns.dispatch_due_task.name == task.name == "campaigns.dispatch_due"
    assert task() == 1  # runs the task body in this process, like a worker would
    assert task() == 0  # a second tick (or a redelivered message) finds nothing due
    with Session(engine) as session:
        [job] = session.scalars(select(ResetJob).where(ResetJob.campaign_id == campaign_id)).all()
        missed = session.scalar(select(func.count()).select_from(CampaignOccurrence)
                                .where(CampaignOccurrence.outcome == "missed"))
    assert published == [("resets.start", [str(job.id)])]
    assert 0 < missed <= 12  # the two hours of 10-minute occurrences before the latest one
    engine.dispose()

    config = celery_config(get_settings())
    assert config["task_routes"]["campaigns.dispatch_due"] == {"queue": "maintenance"}
    entry = next(e for e in config["beat_schedule"].values() if e["task"] == "campaigns.dispatch_due")
    assert entry["schedule"] == 60.0
    # A plain periodic tick: no ETA/countdown, the schedule itself lives in the database.
    assert not {"eta", "countdown"} & set(entry.get("options", {}))
