"""RabbitMQ as the broker (issue 20, item 1): real RabbitMQ, real worker processes, real PostgreSQL.

Each test gets a virtual host of its own on the shared server (``rabbitmq_vhost``) and its own
database; Redis (``REDIS_URL``) still holds the notification rate limit and the health replies.
"""

from __future__ import annotations

import math
import secrets
import time
from datetime import datetime, timezone

import pytest
import redis

from models.canary import reply_store
from models.db import dispose_engine, session_scope
from models.messaging import send_now
from models.queues import MALFORMED_COUNTS_KEY, QUEUES, canary_task_name, malformed_key
from models.settings import get_settings
from models.seed import seed
from producer import resets
from tests import fault_support as fs
from tests import rabbitmq_support as rmq
from tests.reset_checks import assert_reset_exact, snapshot, targeted
from tests.test_resets_e2e import wait_for_job
from workers.rabbitmq import queue_lengths

pytestmark = pytest.mark.e2e


@pytest.fixture
def amqp_env(fresh_db, use_env, redis_url, rabbitmq_vhost, tmp_path):
    """Factory: ``amqp_env(**env)`` -> ``(environment, vhost)`` for workers on a fresh vhost and database."""
    def make(**env):
        url = rabbitmq_vhost()
        values = {"DATABASE_URL": fresh_db(), "CELERY_BROKER_URL": url, "REDIS_URL": redis_url,
                  "RESET_BATCH_SIZE": "100", "NOTIFY_CONSOLE_PATH": str(tmp_path / "notifications.jsonl"),
                  "NOTIFY_RATE_PER_SECOND": "5000", "LOG_FORMAT": "json", **env}
        return use_env(**values), url.rsplit("/", 1)[1]

    yield make
    dispose_engine()


def reset(org, course: int, learner: int | None = None, timeout: float = 90) -> tuple[str, dict]:
    with session_scope() as session:
        before = snapshot(session, org.course_ids)
        req = resets.request(session, org.admin_id, course, learner_id=learner, reason="broker check")
    with session_scope() as session:
        job = resets.confirm(session, req.request_id, org.admin_id, req.token)
    st = wait_for_job(job.job_id, timeout=timeout)
    assert st["state"] == "succeeded", st
    with session_scope() as session:
        assert_reset_exact(session, before, job.job_id, course, {learner} if learner else targeted(before, course))
    return job.job_id, st


def test_the_celery_settings_follow_the_broker(use_env):
    from workers.app import app

    use_env(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//")
    declared = {q.name: (q.exchange.name, q.exchange.type, q.queue_arguments, q.durable)
                for q in app.amqp.queues.values()}
    assert declared == {q: ("progress_reset", "topic", {"x-queue-type": "quorum"}, True) for q in QUEUES}
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.conf.worker_prefetch_multiplier == 1 and app.conf.task_acks_late
    assert app.conf.worker_consumer == "workers.rabbitmq:Consumer"  # sets malformed messages aside
    use_env(RABBITMQ_QUEUE_TYPE="classic")
    assert {q.queue_arguments["x-queue-type"] for q in app.amqp.queues.values()} == {"classic"}
    # Back on Redis nothing of RabbitMQ's is left in the reconfigured app.
    use_env(CELERY_BROKER_URL="redis://127.0.0.1:6379/9", RABBITMQ_QUEUE_TYPE=None)
    assert all(not q.queue_arguments and q.exchange.type == "direct" for q in app.amqp.queues.values())
    assert "confirm_publish" not in app.conf.broker_transport_options
    assert app.conf.worker_consumer == "celery.worker.consumer:Consumer"  # the Redis transport does it there


@pytest.mark.parametrize("given, sent", [(None, None), (0, 0), (0.05, 1.0), (0.5, 1.0), (1, 1.0), (2.2, 3.0),
                                         (60.05, 61.0)])
def test_countdowns_are_whole_seconds_on_quorum_queues(given, sent):
    from workers.rabbitmq import whole_seconds

    assert whole_seconds(given) == sent


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_queues_are_declared_as_chosen_and_resets_run_on_them(amqp_env, celery_worker_proc, queue_type):
    env, vhost = amqp_env(**({"RABBITMQ_QUEUE_TYPE": queue_type} if queue_type == "classic" else {}))
    with session_scope() as session:
        org = seed(session, learners=400, lessons=3, courses=2, completed_ratio=0.4, random_seed=5)
    celery_worker_proc(env, concurrency=2, name=f"rabbit-{queue_type}")

    declared = rmq.queue_types(vhost)
    assert {q: declared.get(q) for q in QUEUES} == {q: queue_type for q in QUEUES}, declared
    delay_queues = {q: t for q, t in declared.items() if q.startswith("celery_delayed_")}
    if queue_type == "quorum":
        # Native delayed delivery: 28 levels of delay queues, quorum themselves.
        assert len(delay_queues) == 28 and set(delay_queues.values()) == {"quorum"}, delay_queues
    else:
        assert not delay_queues, "classic queues take countdowns in the worker (global QoS)"

    course, other = org.course_ids
    _job, st = reset(org, course)
    assert st["batches_total"] >= 2
    reset(org, other, learner=org.learner_id)




# --- Health and queue lengths ----------------------------------------------------------------------

def test_health_and_queue_lengths_on_rabbitmq(amqp_env, celery_worker_proc):
    """Queue lengths come from passive declares; ``progress-reset health`` proves every queue is
    consumed, as on Redis, and names the queue type it checked."""
    import json

    from producer.metrics import ResetSystemCollector
    from prometheus_client import CollectorRegistry, generate_latest
    from tests.test_http_api import run_cli
    from workers.health import queue_lengths as broker_queue_lengths

    env, _vhost = amqp_env()
    for _ in range(3):  # nobody consumes maintenance yet
        assert send_now(canary_task_name("maintenance"), ["ab" * 8])
    assert broker_queue_lengths(get_settings())["maintenance"] == 3
    registry = CollectorRegistry()
    registry.register(ResetSystemCollector())
    assert 'progress_reset_queue_length{queue="maintenance"} 3.0' in generate_latest(registry).decode()

    celery_worker_proc(env, concurrency=2, name="health")
    healthy = run_cli(env, "health", "--json", "--timeout", "15")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    report = json.loads(healthy.stdout)
    assert report["broker"]["detail"].endswith("(quorum queues)"), report["broker"]
    assert {q: r["state"] for q, r in report["queues"].items()} == dict.fromkeys(QUEUES, "ok")
    assert broker_queue_lengths(get_settings())["maintenance"] == 0


def test_health_names_a_queue_declared_with_the_other_type(amqp_env):
    """Queues keep the type they were declared with: after RABBITMQ_QUEUE_TYPE changed, health
    says which queue is in the way and what to do, in one line."""
    from tests.test_http_api import run_cli
    from workers.rabbitmq import declaration_problem

    env, vhost = amqp_env(RABBITMQ_QUEUE_TYPE="classic")
    assert declaration_problem(get_settings()) is None  # declares the five classic queues
    assert set(rmq.queue_types(vhost).values()) == {"classic"}
    result = run_cli({**env, "RABBITMQ_QUEUE_TYPE": "quorum"}, "health", "--timeout", "3")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "queue resets cannot be declared as a quorum queue" in errors[0], errors[0]
    assert "inequivalent arg 'x-queue-type'" in errors[0] and "docs/operations.md" in errors[0]


# --- Countdowns -----------------------------------------------------------------------------------

@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_countdowns_arrive_once_due(amqp_env, celery_worker_proc, queue_type):
    """Every countdown the project publishes (0.5 s wake-up retries, unit backoffs, follow-ups and
    wake-ups of up to a minute) runs once due, not earlier. On quorum queues it waits in RabbitMQ's
    delay queues, rounded up to whole seconds (Celery refuses less than one), so it never sits in
    a worker holding a prefetch slot; on classic queues the worker holds it (global QoS)."""
    env, _vhost = amqp_env(RABBITMQ_QUEUE_TYPE=queue_type)
    worker = celery_worker_proc(env, concurrency=2, name="countdowns")
    nonce = secrets.token_hex(8)
    countdowns = {"resets": 0.5, "reset_batches": 2.2, "notifications": None, "webhooks": 1.0}
    published = {}
    for queue, countdown in countdowns.items():
        published[queue] = datetime.now(timezone.utc)
        assert send_now(canary_task_name(queue), [nonce], countdown=countdown)
    delayed = queue_lengths(env["CELERY_BROKER_URL"], [f"celery_delayed_{level}" for level in range(28)])
    # Meanwhile, on quorum queues, the three delayed ones wait in RabbitMQ, not in the worker.
    assert sum(delayed.values()) == (3 if queue_type == "quorum" else 0), delayed
    store = reply_store(get_settings())
    try:
        replies = fs.wait_until(lambda: (r := store.get_many(nonce, list(countdowns))) and len(r) == len(countdowns)
                                and r, 30, what="every canary to run")
    finally:
        store.close()
    for queue, countdown in countdowns.items():
        ran_after = (datetime.fromisoformat(replies[queue]["at"]) - published[queue]).total_seconds()
        due = (math.ceil(countdown) if queue_type == "quorum" else countdown) if countdown else 0
        assert due - 0.05 <= ran_after <= due + 2.5, (queue, countdown, ran_after)
    assert "Direct exchanges are not supported" not in worker.log_text()


def _retry_runs(worker) -> list[int]:
    import json

    return [json.loads(line)["retries"] for line in worker.log_text().splitlines() if '"tests.retry.run"' in line]


@pytest.mark.parametrize("app", ["retrying_app", "retrying_app_as_celery_does"])
def test_a_task_retried_through_the_delay_queues_again_and_again_is_not_lost(amqp_env, tmp_path, app):
    """A task retried three times with a 3 s countdown (delay queues of 2 s and 1 s, each time):
    every retry runs. Celery 5.5 copies RabbitMQ's ``x-death`` header into the retry, and RabbitMQ
    before 4.0.1 then drops the second delayed retry as a dead-letter cycle; the project's app
    removes those headers before publishing (``workers.rabbitmq.drop_broker_headers``)."""
    env, _vhost = amqp_env()
    procs = fs.Processes(tmp_path)
    try:
        worker = procs.worker(env, "resets", concurrency=1, name="retries", app=f"tests.rabbitmq_support:{app}")
        assert send_now(rmq.RETRY_TASK, [3])
        if app == "retrying_app":
            fs.wait_until(lambda: _retry_runs(worker) == [0, 1, 2, 3], 30, interval=0.2,
                          what=f"the task and its three retries to run (runs so far: {_retry_runs(worker)})")
            return
        if rmq.server_version(env["CELERY_BROKER_URL"]) >= (4, 0, 1):
            pytest.skip("RabbitMQ 4.0.1 and later no longer see a cycle in a republished message")
        # Without the project's publish hook: the second delayed retry vanishes in the broker.
        fs.wait_until(lambda: len(_retry_runs(worker)) >= 2, 20, interval=0.2, what="the first retry to run")
        time.sleep(8)
        assert _retry_runs(worker) == [0, 1], "expected RabbitMQ to drop the retry (dead-letter cycle)"
    finally:
        procs.stop_all()



def test_notifications_that_failed_come_back_by_their_countdown_follow_ups(amqp_env, celery_worker_proc):
    """The provider answers 503 for a while: the rows back off, and the sender's follow-ups,
    published with a countdown to the next due row, bring them back; no sweep runs (no beat)."""
    from tests.notify_support import WebhookSink
    from tests.test_notifications_e2e import notifiable, settled

    sink = WebhookSink().start()
    try:
        env, _vhost = amqp_env(**sink.env())
        with session_scope() as session:
            org = seed(session, learners=300, lessons=2, courses=1, completed_ratio=0.5, random_seed=13)
        wanted = notifiable(org.course_ids[0])
        sink.state.fail_status = 503
        celery_worker_proc(env, concurrency=2, name="notify")
        job_id, _st = reset(org, org.course_ids[0])
        # A refused send holds the run's other rows back too (provider_unavailable): the next run
        # is a follow-up published with a countdown to the row's backoff (1, 2, 4 s ...).
        fs.wait_until(lambda: len(sink.deliveries()) >= 3, 30, what="three refused sends")
        sink.state.fail_status = None
        st = settled(job_id, timeout=60)
    finally:
        sink.stop()
    assert st["notifications"] == {"pending": 0, "sent": len(wanted), "failed": 0}, st
    assert sink.keys_per_learner() == {uid: 1 for uid in wanted}


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_rate_limited_notifications_keep_their_rate_when_countdowns_are_whole_seconds(amqp_env, celery_worker_proc,
                                                                                       queue_type):
    """Reserved send slots lie a fraction of a second ahead, but quorum queues deliver a delayed
    message in whole seconds: the chain's message goes early and the courier waits the rest, so
    the rate holds and no slot is missed (a late message would reserve again, and again)."""
    from tests.notify_support import WebhookSink, insert_outbox, measured_rate
    from tasks.ratelimit import notification_group_size

    rate = 20.0
    sink = WebhookSink().start()
    try:
        env, _vhost = amqp_env(NOTIFY_RATE_PER_SECOND=str(rate), RABBITMQ_QUEUE_TYPE=queue_type, **sink.env())
        with session_scope() as session:
            org = seed(session, learners=400, lessons=2, random_seed=14)
            job_id, users = insert_outbox(session, org.course_ids[0])
        assert len(users) >= 150
        workers = [celery_worker_proc(env, queues="notifications", concurrency=2, name=f"rate{i}") for i in (1, 2)]
        for _ in range(3):  # a job's messages collapse into one chain, whichever worker runs them
            assert send_now("notifications.send", [str(job_id)])
        fs.wait_until(lambda: len(sink.accepted()) == len(users), len(users) / rate * 2 + 20, what="all notifications")
    finally:
        sink.stop()
    logs = "".join(w.log_text() for w in workers)
    stamps = sorted(d.at for d in sink.accepted().values())
    measured = measured_rate(stamps)
    group = notification_group_size(get_settings())
    busiest = max(sum(1 for t in stamps[i:i + int(rate * 2)] if t < start + 1.0) for i, start in enumerate(stamps))
    print(f"\n{queue_type}: {len(stamps)} notifications at {measured:.1f}/s (limit {rate:.0f}/s), busiest second "
          f"{busiest} (at most {group} + {rate:.0f}), slots missed {logs.count('notification.slots_missed')}")
    assert sink.keys_per_learner() == {u: 1 for u in users}
    assert measured == pytest.approx(rate, rel=0.15), measured
    assert busiest <= group + rate + 1
    assert logs.count("notification.slots_missed") <= 2
    # Workers of the notifications queue alone: every queue was declared, so Celery bound them all.
    assert "Native delayed delivery will not be available" not in logs


# --- Undecodable and foreign messages (decision record 0006) ----------------------------------------

# As anyone with access to the virtual host could publish them.
RAW = {
    "resets": [dict(body=b"this is not json"), dict(body=b"\xff\xfe not utf-8", content_type="application/json")],
    "reset_batches": [dict(body=b'{"json": true}', content_type="application/json"),
                      dict(body=b"[1, 2, 3]", content_type="application/json")],
    "notifications": [dict(body=b"not json", content_type="application/json",
                           headers={"task": "notifications.send", "id": "n1"}),
                      dict(body=b"\x1f\x8b garbage", content_type="application/json",
                           headers={"task": "notifications.send", "id": "n2", "compression": "application/x-gzip"})],
    "maintenance": [dict(body=b"\x80\x04garbage", content_type="application/x-python-serialize",
                         headers={"task": "maintenance.sweep", "id": "m1"})],
    "webhooks": [dict(body=b'[[], {}, {}]', content_type="application/json",
                      headers={"task": "no.such.task", "id": "f1"}),
                 dict(body=b'[[], {}, {}]', content_type="application/json", headers={"task": 42, "id": "f2"})],
}


def publish_raw(url: str, queue: str, body: bytes, content_type: str | None = None, headers: dict | None = None):
    import amqp

    parts = url.split("/")
    conn = amqp.Connection(host=parts[2].split("@")[1], userid="guest", password="guest",
                           virtual_host=parts[3])
    conn.connect()
    try:
        ch = conn.channel()
        props = {"application_headers": headers or {}, "delivery_mode": 2}
        if content_type:
            props["content_type"] = content_type
        ch.basic_publish(amqp.Message(body, **props), exchange="", routing_key=queue)
    finally:
        conn.close()


def kept_bodies(url: str, queue: str) -> list[bytes]:
    """The bodies kept in ``<queue>.malformed`` (taken off it)."""
    import amqp

    parts = url.split("/")
    conn = amqp.Connection(host=parts[2].split("@")[1], userid="guest", password="guest", virtual_host=parts[3])
    conn.connect()
    bodies = []
    try:
        ch = conn.channel()
        while (message := ch.basic_get(malformed_key(queue), no_ack=True)) is not None:
            bodies.append(message.body)
    finally:
        conn.close()
    return bodies


def test_malformed_messages_on_every_queue_are_set_aside_and_the_worker_keeps_serving(amqp_env, celery_worker_proc):
    """What Celery would log with its body and drop, the worker moves, untouched, to
    ``<queue>.malformed``; it logs (never the content) and counts it, and keeps serving."""
    import json

    from tests.test_malformed_messages import assert_malformed_metrics

    env, _vhost = amqp_env()
    redis.Redis.from_url(env["REDIS_URL"]).delete(MALFORMED_COUNTS_KEY)
    with session_scope() as session:
        org = seed(session, learners=300, lessons=3, courses=2, completed_ratio=0.4, random_seed=2)
    worker = celery_worker_proc(env, concurrency=1, name="poison")
    url = env["CELERY_BROKER_URL"]
    for queue, messages in RAW.items():
        for message in messages:
            publish_raw(url, queue, **message)
    malformed = [malformed_key(q) for q in RAW]
    fs.wait_until(lambda: queue_lengths(url, malformed) == {malformed_key(q): len(m) for q, m in RAW.items()}, 30,
                  what="every malformed message to be set aside")
    assert queue_lengths(url, QUEUES) == dict.fromkeys(QUEUES, 0)
    assert worker.alive(), worker.log_tail(60)

    logged = [json.loads(line) for line in worker.log_text().splitlines() if '"broker.message.malformed"' in line]
    assert len(logged) == sum(len(m) for m in RAW.values()), logged
    assert {entry["queue"] for entry in logged} == set(RAW)
    log = worker.log_text()
    assert "this is not json" not in log and "not json" not in json.dumps(logged)
    assert_malformed_metrics({queue: len(messages) for queue, messages in RAW.items()})
    # Kept byte for byte, for inspection.
    assert sorted(kept_bodies(url, "resets")) == sorted(m["body"] for m in RAW["resets"])

    # The same worker process still does its work, on every queue.
    course, other = org.course_ids
    reset(org, course)
    reset(org, other, learner=org.learner_id)
    assert worker.alive() and "Unrecoverable error" not in worker.log_text()
