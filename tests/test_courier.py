"""The courier's lanes and places (tasks/outbound/courier.py), with real threads and events."""

from __future__ import annotations

import threading

from models.settings import Settings
from tasks.outbound.courier import Courier, InlineCourier, courier_for

WAIT = 5.0


class Gate:
    """Jobs that say when they start and wait until they are let go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.running = 0
        self.most = 0
        self.release = threading.Event()
        self.changed = threading.Condition(self.lock)

    def job(self, name: str):
        def run() -> None:
            with self.lock:
                self.started.append(name)
                self.running += 1
                self.most = max(self.most, self.running)
                self.changed.notify_all()
            self.release.wait(WAIT)
            with self.lock:
                self.running -= 1
        return run

    def wait_started(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.started) >= count, WAIT)


def test_a_lane_at_its_cap_waits_while_another_lane_starts_at_once():
    gate = Gate()
    courier = Courier(4, lambda lane: 2)
    for i in range(4):
        assert courier.offer(("slow", i), "organization:1", gate.job(f"slow{i}"))
    assert gate.wait_started(2)
    assert courier.offer(("fast", 0), "organization:2", gate.job("fast0"))
    assert gate.wait_started(3)
    assert gate.started[2] == "fast0", gate.started  # not behind the slow lane's waiting jobs
    assert courier.offer(("slow", 0), "organization:1", gate.job("again")) is False  # already there
    gate.release.set()
    assert courier.wait_idle(WAIT)
    assert sorted(gate.started) == ["fast0", "slow0", "slow1", "slow2", "slow3"]
    assert gate.most == 3  # two of the slow lane (its cap) and the other lane's one


def test_a_held_place_counts_against_the_lane_until_it_is_used_or_given_back():
    gate = Gate()
    courier = Courier(2, lambda lane: 1)
    assert courier.hold("notifications")
    assert not courier.hold("notifications")  # the lane's one place is held
    courier.release("notifications")
    assert courier.hold("notifications")
    courier.run_held(("group", 1), "notifications", gate.job("group1"))
    assert gate.wait_started(1)
    assert not courier.hold("notifications")  # now the place runs the group
    gate.release.set()
    assert courier.wait_idle(WAIT)
    assert courier.hold("notifications")
    courier.release("notifications")


def test_again_runs_a_job_once_more_behind_what_waits():
    order: list[str] = []
    courier = Courier(1, lambda lane: 1)
    first_turn = threading.Event()
    rounds = {"n": 0}

    def endpoint() -> None:
        rounds["n"] += 1
        order.append(f"endpoint{rounds['n']}")
        if rounds["n"] == 1:
            first_turn.wait(WAIT)
            courier.again(("webhooks", 1), "organization:1", endpoint)

    courier.offer(("webhooks", 1), "organization:1", endpoint)
    courier.offer(("webhooks", 2), "organization:1", lambda: order.append("other"))
    first_turn.set()
    assert courier.wait_idle(WAIT)
    assert order == ["endpoint1", "other", "endpoint2"]


def test_a_failing_job_is_logged_and_frees_its_place(caplog):
    courier = Courier(1, lambda lane: 1)
    courier.offer("boom", "organization:1", lambda: 1 / 0)
    ran = threading.Event()
    courier.offer("next", "organization:1", ran.set)
    assert ran.wait(WAIT) and courier.wait_idle(WAIT)
    assert "outbound.job.failed" in caplog.text


def test_outbound_concurrency_zero_runs_every_call_inside_the_task():
    courier = courier_for(Settings.from_env({"OUTBOUND_CONCURRENCY": "0"}))
    assert isinstance(courier, InlineCourier)
    caller = threading.current_thread()
    seen: list[tuple[threading.Thread, int]] = []

    def endpoint() -> None:
        seen.append((threading.current_thread(), len(seen)))
        if len(seen) < 3:
            courier.again("endpoint", "organization:1", endpoint)

    assert courier.offer("endpoint", "organization:1", endpoint)  # returns once it has nothing left
    assert seen == [(caller, 0), (caller, 1), (caller, 2)]
    assert courier.hold("notifications") and courier.wait_idle(0)
