"""The outside world never holds the pipeline: real worker processes, beat, the HTTP API and
receivers on loopback that trickle, hang or answer without end.

- every attempt ends by its total deadline, the attempt limit holds with beat sweeping, and no
  two attempts of one delivery overlap;
- a receiver's answer is read up to 64 KiB: the worker's memory stays flat;
- another organization's one-learner resets and webhook deliveries are not delayed meanwhile,
  on one worker consuming every queue;
- a notification run waiting for the rate limit holds no pool slot;
- the same message delivered twice at once (``notifications.send``, ``webhooks.deliver``) sends
  every row once.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest
from sqlalchemy import select

from models.db import session_scope
from models.messaging import send_now
from models.schema import WebhookDelivery
from tests.notify_support import WebhookSink, insert_outbox, wait_until
from bench.receivers import BadReceiver, rss_bytes
from tests.test_http_api import api_env, start_api, tenants, wait_for_state  # noqa: F401 - fixtures
from tests.test_webhooks_e2e import ALL_QUEUES, a_learner, run_reset, subscribe
from tests.webhook_support import Receiver
from workers.processes import REPO_ROOT, start_celery

pytestmark = pytest.mark.e2e

DEADLINE = 2.0
MAX_ATTEMPTS = 3


@pytest.fixture
def outside_env(api_env, use_env):
    return use_env(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true", WEBHOOKS_TIMEOUT_SECONDS=str(DEADLINE),
                   WEBHOOKS_MAX_ATTEMPTS=str(MAX_ATTEMPTS), WEBHOOKS_RETRY_BASE_SECONDS="0.3",
                   WEBHOOKS_RETRY_MAX_SECONDS="1", SWEEP_INTERVAL_SECONDS="1", PUBLISH_STALE_SECONDS="1",
                   RESET_JOB_STALE_SECONDS="2")


@pytest.fixture
def bad_receivers():
    made: list[BadReceiver] = []

    def make(mode: str, **kwargs) -> BadReceiver:
        made.append(BadReceiver(mode, **kwargs).start())
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def beat(tmp_path):
    started = []

    def start(env: dict[str, str]):
        proc = start_celery(["beat", "-l", "info", "-s", str(tmp_path / "beat-schedule")], env=env,
                            log_path=tmp_path / "beat.log", name="beat", cwd=REPO_ROOT,
                            ready_pattern=r"beat: Starting")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def subscribe_url(api, url: str, events=("reset.confirmed", "reset.succeeded")) -> int:
    created = api.post("/v1/webhooks", json={"url": url, "events": list(events)})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def one_learner_reset_seconds(api, tenant, course: int, learner: int) -> float:
    started = time.monotonic()
    job = run_reset(api, tenant, course, learner)
    st = wait_for_state(api, job, timeout=30)
    assert st["state"] == "succeeded", st
    return time.monotonic() - started


def deliveries_of(endpoint_ids: list[int]) -> list:
    with session_scope() as session:
        return session.execute(select(WebhookDelivery).where(WebhookDelivery.endpoint_id.in_(endpoint_ids))
                               .execution_options(populate_existing=True)).scalars().all()


def test_trickling_and_hanging_receivers_end_at_their_deadline_and_hold_no_one_else(
        outside_env, tenants, start_api, celery_worker_proc, bad_receivers, beat):
    a, b = tenants.a, tenants.b
    # The README's one worker on every queue (two pool slots), and beat sweeping every second.
    worker = celery_worker_proc(outside_env, queues=ALL_QUEUES, concurrency=2, name="all")
    beat(outside_env)
    server = start_api(outside_env)
    bad = [bad_receivers("trickle", every=0.5), bad_receivers("trickle", every=0.5), bad_receivers("hang"),
           bad_receivers("hang")]
    healthy = Receiver().start()
    try:
        with server.client(a.key) as as_a, server.client(b.key) as as_b:
            a_endpoints = [subscribe_url(as_a, r.url) for r in bad]
            subscribe(as_b, healthy, ["reset.confirmed", "reset.succeeded"])
            one_learner_reset_seconds(as_a, a, a.course_ids[0], a_learner(a.course_ids[0]))  # 8 bad deliveries
            wait_until(lambda: all(r.got() for r in bad), 20, what="A's receivers to be called")

            # B's work while A's receivers hold their attempts open.
            b_resets = [one_learner_reset_seconds(as_b, b, b.course_ids[0], learner) for learner in
                        b_learners(b.course_ids[0], 4)]
            wait_until(lambda: len(healthy.distinct()) >= 8, 20, what="B's events")
            arrivals = healthy.got()
            wait_until(lambda: all(d.status == "failed" for d in deliveries_of(a_endpoints))
                       and len(deliveries_of(a_endpoints)) == 2 * len(bad), 90, what="A's deliveries to end")
    finally:
        healthy.stop()
    print(f"\nB's one-learner resets while A's receivers trickled and hung: "
          f"{', '.join(f'{s:.2f}' for s in b_resets)} s")
    assert max(b_resets) < 2.0, b_resets
    assert all(r.signature_ok for r in arrivals)

    for delivery in deliveries_of(a_endpoints):
        assert delivery.attempts == MAX_ATTEMPTS, "the attempt limit holds, with beat sweeping every second"
        assert delivery.last_error == f"no complete answer within {DEADLINE:g}s"
    for receiver in bad:
        per_event: dict[str, list] = {}
        for request in receiver.got():
            assert request.ended is not None and request.ended - request.started <= DEADLINE + 1.0, request
            per_event.setdefault(request.message_id, []).append(request)
        assert sorted(len(v) for v in per_event.values()) == [MAX_ATTEMPTS, MAX_ATTEMPTS]
        for attempts in per_event.values():  # an attempt began only once the one before had reached its deadline
            attempts.sort(key=lambda r: r.started)
            assert all(y.started >= x.started + DEADLINE - 0.05 for x, y in zip(attempts, attempts[1:])), attempts
    # Every webhooks.deliver ran in milliseconds: the calls were on the courier's threads.
    runtimes = [float(t) for t in re.findall(r"Task webhooks\.deliver\[[^\]]+\] succeeded in ([0-9.]+)s",
                                             worker.log_text())]
    assert runtimes and max(runtimes) < 0.5, max(runtimes)


def b_learners(course: int, count: int) -> list[int]:
    from models.schema import CourseAssignment
    from models.states import AssignmentStatus

    with session_scope() as session:
        return list(session.scalars(select(CourseAssignment.user_id).where(
            CourseAssignment.course_id == course, CourseAssignment.status != AssignmentStatus.NOT_STARTED)
            .order_by(CourseAssignment.user_id).limit(count)))


def test_a_huge_answer_is_read_up_to_its_cap_and_the_worker_memory_stays_flat(
        outside_env, tenants, start_api, celery_worker_proc, bad_receivers):
    a = tenants.a
    worker = celery_worker_proc(outside_env, queues=ALL_QUEUES, concurrency=2, name="all")
    server = start_api(outside_env)
    huge = bad_receivers("huge")
    warm = Receiver().start()
    with server.client(a.key) as api:
        # A first delivery in each pool process: what a worker loads once is loaded before measuring.
        warm_endpoint = subscribe(api, warm, ["reset.confirmed"])["id"]
        for course in a.course_ids[1:]:
            run_reset(api, a, course, a_learner(course))
        wait_until(lambda: len(warm.distinct()) == len(a.course_ids) - 1, 30, what="the warm-up deliveries")
        warm.stop()
        assert api.delete(f"/v1/webhooks/{warm_endpoint}").status_code == 200
        endpoint = subscribe_url(api, huge.url, ["reset.confirmed"])
        before = rss_bytes([worker.pid, *worker.children()])
        run_reset(api, a, a.course_ids[0], a_learner(a.course_ids[0]))
        wait_until(lambda: all(d.status == "failed" for d in deliveries_of([endpoint]))
                   and deliveries_of([endpoint]), 60, what="the delivery to give up")
        after = rss_bytes([worker.pid, *worker.children()])
    (delivery,) = deliveries_of([endpoint])
    assert delivery.attempts == MAX_ATTEMPTS and delivery.last_status_code == 500
    assert delivery.last_error.startswith("HTTP 500 xxx") and len(delivery.last_error) <= 300
    written = [r.written for r in huge.got()]
    print(f"\nworker RSS {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB; bytes the receiver got out per "
          f"attempt before the worker hung up: {written}")
    assert len(written) == MAX_ATTEMPTS and max(written) < 64 * 2**20, "the rest of a 400 MB answer is never read"
    assert after - before < 20 * 2**20, (before, after)


def test_waiting_for_the_rate_limit_holds_no_slot_a_reset_unit_needs(outside_env, tenants, start_api,
                                                                      celery_worker_proc, use_env):
    a, b = tenants.a, tenants.b
    env = use_env(NOTIFY_RATE_PER_SECOND="5")  # a slow provider: 200 notifications take 40 s
    worker = celery_worker_proc(env, queues=ALL_QUEUES, concurrency=2, name="all")
    server = start_api(env)
    with session_scope() as session:
        job_id, users = insert_outbox(session, a.course_ids[0])
        more, more_users = insert_outbox(session, a.course_ids[1])
    for job in (job_id, more) * 3:
        assert send_now("notifications.send", [str(job)])
    time.sleep(2.0)  # the notification chains are under way, waiting for their slots
    with server.client(b.key) as api:
        b_resets = [one_learner_reset_seconds(api, b, b.course_ids[0], learner)
                    for learner in b_learners(b.course_ids[0], 4)]
    print(f"\nB's one-learner resets while notifications waited for a 5/s rate: "
          f"{', '.join(f'{s:.2f}' for s in b_resets)} s")
    assert max(b_resets) < 2.0, b_resets
    runtimes = [float(t) for t in re.findall(r"Task notifications\.send\[[^\]]+\] succeeded in ([0-9.]+)s",
                                             worker.log_text())]
    assert len(runtimes) >= 6 and max(runtimes) < 0.5, runtimes


def test_the_same_messages_delivered_twice_at_once_send_every_row_once(
        outside_env, tenants, start_api, celery_worker_proc, use_env):
    a = tenants.a
    sink = WebhookSink().start()
    receiver = Receiver().start()
    try:
        env = use_env(NOTIFY_RATE_PER_SECOND="2000", NOTIFY_CHUNK_SIZE="10", **sink.env())
        # Two workers, so the two copies of each message run at the same moment in different processes.
        workers = [celery_worker_proc(env, queues=ALL_QUEUES, concurrency=2, name=f"dup{i}")
                   for i in (1, 2)]
        with session_scope() as session:
            job_id, users = insert_outbox(session, a.course_ids[0])
        for _ in range(3):
            message_id = str(uuid.uuid4())
            for _copy in range(2):  # the same message (same id), as a broker redelivering it would
                assert send_now("notifications.send", [str(job_id)], task_id=message_id)
        server = start_api(env)
        with server.client(a.key) as api:
            endpoint = subscribe(api, receiver, ["reset.confirmed", "reset.succeeded"])["id"]
            for course in a.course_ids:
                run_reset(api, a, course, a_learner(course))
            wait_until(lambda: len(deliveries_of([endpoint])) == 2 * len(a.course_ids), 30, what="the events")
        for _ in range(3):
            message_id = str(uuid.uuid4())
            for _copy in range(2):
                assert send_now("webhooks.deliver", [endpoint], task_id=message_id)
        def of_job(found):
            return [d for d in found if d.payload and d.payload["reset_job_id"] == str(job_id)]

        wait_until(lambda: len(of_job(sink.accepted().values())) == len(users), 60, what="every notification")
        wait_until(lambda: len(receiver.distinct()) == 2 * len(a.course_ids), 30, what="every event")
        time.sleep(2.0)  # a duplicate would arrive now
    finally:
        sink.stop()
        receiver.stop()
    accepted = of_job(sink.accepted().values())
    assert sorted(d.payload["learner"]["id"] for d in accepted) == sorted(users)
    assert len(of_job(sink.deliveries())) == len(users), "not even a duplicate for the provider to drop"
    assert len(receiver.got()) == 2 * len(a.course_ids), "each event delivered once"
    assert all(w.alive() for w in workers)
