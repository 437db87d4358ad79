"""Issue 13 item 2: a message no worker can decode, pushed raw onto any queue, never stops the worker.

Raw ``LPUSH`` to the real Redis the worker consumes, a real worker process (prefork), real
PostgreSQL: each such message ends up on ``<queue>.malformed``, untouched, is logged and counted
in ``/metrics``, and the same worker process then completes a course-wide and a one-learner reset.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from models.db import session_scope
from models.seed import seed
from producer import resets
from producer.metrics import ResetSystemCollector
from tests.test_resets_e2e import env, wait_for_job  # noqa: F401 - env is a fixture
from models.queues import MALFORMED_COUNTS_KEY, malformed_key

pytestmark = pytest.mark.e2e

_ENVELOPE_WITHOUT_TAG = '{"body":"!!!","headers":{},"properties":{}}'
_UNKNOWN_BODY_ENCODING = json.dumps({
    "body": "e30=", "content-type": "application/json", "content-encoding": "utf-8", "headers": {},
    "properties": {"delivery_tag": "t-1", "body_encoding": "rot13",
                   "delivery_info": {"exchange": "", "routing_key": "notifications"}},
})


def envelope(queue: str, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> str:
    """A kombu envelope as Celery writes it, around ``body``."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-type": content_type, "content-encoding": "utf-8",
        "headers": headers or {}, "properties": {"delivery_tag": f"t-{queue}-{len(body)}", "body_encoding": "base64",
                                                 "delivery_info": {"exchange": "", "routing_key": queue}},
    })


MALFORMED = {
    "resets": ["this is not json", _ENVELOPE_WITHOUT_TAG],
    "reset_batches": ['{"json": true}', "[1, 2, 3]"],
    "notifications": [_UNKNOWN_BODY_ENCODING, "\xff\xfe not utf-8",
                      envelope("notifications", b"not json", headers={"task": "notifications.send", "id": "n1"})],
    "maintenance": ['{"properties": {"delivery_tag": "x"}}',
                    envelope("maintenance", b"\x80\x04garbage", "application/x-python-serialize",
                             headers={"task": "maintenance.sweep", "id": "m1"})],
}
# Decodable, but no task of ours: Celery itself logs and drops these; the worker must survive them too.
FOREIGN = {
    "resets": envelope("resets", b'[[], {}, {}]', headers={"task": "no.such.task", "id": "f1"}),
    "reset_batches": envelope("reset_batches", b'{"not": "a task"}'),
}


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def reset_and_wait(org, course, learner=None) -> dict:
    with session_scope() as session:
        req = resets.request(session, org.admin_id, course, learner_id=learner, reason="after poison")
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)
    return wait_for_job(job.job_id, timeout=120)


def test_item2_malformed_message_on_every_queue_is_set_aside_and_the_worker_keeps_serving(
        env, redis_url, celery_worker_proc):
    with session_scope() as session:
        org = seed(session, learners=300, lessons=3, courses=2, completed_ratio=0.4, random_seed=2)
    client = redis.Redis.from_url(redis_url)
    client.delete(MALFORMED_COUNTS_KEY, *(malformed_key(q) for q in MALFORMED))
    worker = celery_worker_proc(env, queues=",".join(MALFORMED), concurrency=1, name="poison")
    pushed = 0
    for queue, messages in MALFORMED.items():
        for raw in messages:
            client.lpush(queue, raw.encode("utf-8", "surrogateescape") if "\xff" not in raw
                         else b"\xff\xfe not utf-8")
            pushed += 1

    for queue, raw in FOREIGN.items():
        client.lpush(queue, raw)

    wait_until(lambda: sum(client.llen(malformed_key(q)) for q in MALFORMED) == pushed, 60,
               "every malformed message to be set aside")
    wait_until(lambda: not any(client.llen(q) for q in FOREIGN), 30, "the foreign messages to be consumed")
    assert worker.alive(), worker.log_tail(60)
    for queue, messages in MALFORMED.items():
        kept = [item for item in client.lrange(malformed_key(queue), 0, -1)]
        assert len(kept) == len(messages), (queue, kept)
        assert client.llen(queue) == 0
    # Kept untouched, for inspection.
    assert b"this is not json" in client.lrange(malformed_key("resets"), 0, -1)
    assert _ENVELOPE_WITHOUT_TAG.encode() in client.lrange(malformed_key("resets"), 0, -1)

    # The same worker process still does its work, on every queue it serves.
    course, other = org.course_ids
    st = reset_and_wait(org, course)
    assert st["state"] == "succeeded" and st["learners_done"] == st["learners_total"] > 0, st
    st = reset_and_wait(org, other, learner=org.learner_id)
    assert (st["state"], st["learners_done"]) == ("succeeded", 1), st
    assert worker.alive()
    assert "Unrecoverable error" not in worker.log_text()

    # Logged (queue and reason, never the content) and counted in the metrics.
    logged = [json.loads(line) for line in worker.log_text().splitlines()
              if '"broker.message.malformed"' in line]
    assert len(logged) == pushed, logged
    assert {entry["queue"] for entry in logged} == set(MALFORMED)
    assert not any("this is not json" in json.dumps(entry) for entry in logged)
    assert_malformed_metrics({queue: len(messages) for queue, messages in MALFORMED.items()})
    client.close()


def assert_malformed_metrics(expected: dict[str, int]) -> None:
    """``/metrics`` counts ``expected[queue]`` messages set aside from each queue, all still kept."""
    registry = CollectorRegistry()
    registry.register(ResetSystemCollector())
    text = generate_latest(registry).decode()
    for queue, count in expected.items():
        assert f'progress_reset_broker_malformed_messages_total{{queue="{queue}"}} {float(count)}' in text
        assert f'progress_reset_broker_malformed_kept{{queue="{queue}"}} {float(count)}' in text


def test_item2_a_worker_started_after_the_poison_was_pushed_starts_and_serves(env, redis_url, celery_worker_proc):
    """The malformed messages are already waiting when the worker starts (the issue's second crash)."""
    with session_scope() as session:
        org = seed(session, learners=50, lessons=2, courses=1, completed_ratio=0.5, random_seed=3)
    client = redis.Redis.from_url(redis_url)
    client.delete(MALFORMED_COUNTS_KEY, malformed_key("resets"), malformed_key("reset_batches"))
    client.lpush("resets", _ENVELOPE_WITHOUT_TAG)
    client.lpush("reset_batches", '{"json": true}')
    worker = celery_worker_proc(env, queues="resets,reset_batches,notifications", concurrency=1, name="late")
    wait_until(lambda: client.llen(malformed_key("resets")) + client.llen(malformed_key("reset_batches")) == 2,
               60, "the waiting malformed messages to be set aside")
    st = reset_and_wait(org, org.course_ids[0])
    assert st["state"] == "succeeded", st
    assert worker.alive()
    client.close()
