"""Notifications recover as fast as resets (issue 17, item 6), at the default settings.

A notification worker is SIGKILLed, main process and pool together, while it is sending a job's
notifications: its courier had claimed rows, and its prefetched ``notifications.send`` messages
(the job's chain) die with it; on Redis they come back only after the visibility timeout (an
hour). With beat running the default maintenance sweep, a new worker must send every row within
30 s of its start, each once.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from sqlalchemy import select

from models.db import dispose_engine, session_scope
from models.schema import Notification
from models.states import NotificationStatus
from models.seed import seed
from tests.conftest import REPO_ROOT
from tests.notify_support import WebhookSink, wait_until
from tests.test_notifications_e2e import RESET_QUEUES, confirm_course_reset, job_status, notifiable
from workers.processes import start_celery

pytestmark = pytest.mark.e2e

RECOVERY_BOUND_SECONDS = 30.0


def test_a_killed_notification_worker_s_rows_go_out_within_30s_of_its_restart(
        fresh_db, use_env, redis_url, celery_worker_proc, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    sink = WebhookSink().start()
    beat = None
    try:
        # Default settings: the rate (50/s), the sweep (every 10 s), the send deadline and lease.
        env = use_env(DATABASE_URL=fresh_db(), CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url, LOG_FORMAT="json",
                      **sink.env())
        with session_scope() as session:
            org = seed(session, learners=1200, lessons=2, courses=1, completed_ratio=0.4, random_seed=41)
        course = org.course_ids[0]
        wanted = notifiable(course)
        assert len(wanted) >= 400
        celery_worker_proc(env, queues=RESET_QUEUES + ",maintenance", concurrency=2, name="resets")
        beat = start_celery(["beat", "-l", "info", "-s", str(tmp_path / "beat-schedule")], env=env,
                            log_path=tmp_path / "beat.log", name="beat", cwd=REPO_ROOT)
        first = celery_worker_proc(env, queues="notifications", concurrency=2, name="notify1")
        job_id = confirm_course_reset(org, course)
        wait_until(lambda: len(sink.accepted()) >= len(wanted) // 3, 60, what="sending under way")
        sink.state.stall_seconds = 0.03  # a group of 10 now takes 0.3 s: the kill finds one being sent
        time.sleep(1.0)

        first.kill()  # main process and pool: claimed rows and prefetched messages are lost with it
        claimed = rows_in(job_id, NotificationStatus.SENDING)
        left = len(rows_in(job_id, NotificationStatus.PENDING)) + len(claimed)
        assert claimed and left, "the kill should catch rows claimed and rows waiting"
        sink.state.stall_seconds = 0.0
        second = celery_worker_proc(env, queues="notifications", concurrency=2, name="notify2")
        restarted = time.monotonic()
        wait_until(lambda: not (claimed & rows_in(job_id, NotificationStatus.SENDING, NotificationStatus.PENDING)),
                   RECOVERY_BOUND_SECONDS + 30, interval=0.2, what="the claimed rows to go out again")
        claimed_seconds = time.monotonic() - restarted
        st = wait_until(lambda: (s := job_status(job_id))["notifications"]["pending"] == 0 and s,
                        RECOVERY_BOUND_SECONDS + 30, interval=0.2, what="the notifications to settle")
        all_seconds = time.monotonic() - restarted
    finally:
        if beat is not None:
            beat.stop()
        sink.stop()
        dispose_engine()
    print(f"\n{len(claimed)} rows claimed and {left} unsent at the kill: the claimed ones sent "
          f"{claimed_seconds:.1f}s after the new worker started, all {all_seconds:.1f}s after it "
          f"({left / 50:.1f}s of them at the rate)")
    assert st["notifications"] == {"pending": 0, "sent": len(wanted), "failed": 0}, st
    assert sink.keys_per_learner() == {uid: 1 for uid in wanted}
    assert claimed_seconds <= RECOVERY_BOUND_SECONDS, f"claimed rows sent {claimed_seconds:.1f}s after the restart"
    assert second.alive()


def rows_in(job_id: str, *states: NotificationStatus) -> set[int]:
    with session_scope() as session:
        return set(session.scalars(select(Notification.id).where(Notification.reset_job_id == uuid.UUID(job_id),
                                                                 Notification.status.in_(states))))
