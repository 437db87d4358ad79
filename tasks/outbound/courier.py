"""The courier: calls out of the system run in the background of a worker process, off its pool.

A Celery pool slot is a process that runs one task at a time. If a task waited on an outside
party (a receiver trickling its answer, a provider's rate limit), the slot would wait with it,
and on a worker that serves every queue a reset unit would wait behind it. So the tasks of the
``webhooks`` and ``notifications`` queues only claim their rows (a short transaction) and hand the
calls to this process's courier; they end in milliseconds. The courier runs the calls on its own
threads (``OUTBOUND_CONCURRENCY`` per process), each call bounded by its total deadline.

Work is grouped in *lanes*, each with a cap on how many of its jobs run at once: one lane per
organization for its webhook endpoints (``WEBHOOKS_PER_ORGANIZATION``), one for notifications.
A lane at its cap keeps its further jobs waiting here, so one tenant's slow receivers use at
most their lane's share of the threads, and another tenant's jobs start as soon as a thread is
free. A job is known by a key (an endpoint, say): offering a key that is already running or
waiting adds nothing.

Nothing is lost with the process: every job works on rows claimed under a lease in the
database, and a job that never ran is found again by the maintenance sweep.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from models.logs import log_event
from models.settings import Settings

Job = Callable[[], None]
NOTIFICATIONS_LANE = "notifications"


def organization_lane(organization_id: int) -> str:
    """The lane of one organization's webhook endpoints."""
    return f"organization:{organization_id}"


class Courier:
    """Background threads with per-lane caps; see the module's docstring."""

    def __init__(self, threads: int, lane_cap: Callable[[str], int]):
        self.threads = max(1, threads)
        self._lane_cap = lane_cap
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="courier")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running: dict[Hashable, str] = {}
        self._waiting: dict[Hashable, tuple[str, Job]] = {}
        self._lane_running: Counter[str] = Counter()
        self._held: Counter[str] = Counter()  # places taken by hold() and not yet used
        self._again: dict[Hashable, tuple[str, Job]] = {}  # to wait again once their current run ends

    # -- offering work -------------------------------------------------------------------------

    def offer(self, key: Hashable, lane: str, job: Job) -> bool:
        """Run ``job`` on a courier thread, now or as soon as its lane and a thread have room.
        False when the same key is already running or waiting here (nothing is added).

        The job runs in a copy of the caller's context (its trace among it)."""
        job = partial(contextvars.copy_context().run, job)
        with self._lock:
            if key in self._running or key in self._waiting:
                return False
            self._waiting[key] = (lane, job)
            self._start_what_fits()
        return True

    def again(self, key: Hashable, lane: str, job: Job) -> None:
        """From inside the running job of ``key``: wait again, behind what waits now, once this run ends."""
        with self._lock:
            self._again[key] = (lane, job)

    def hold(self, lane: str) -> bool:
        """Take a place in ``lane`` for work that is about to be claimed; False when there is none now.

        The place is used by :meth:`run_held` or given back by :meth:`release`. Claiming rows only
        when a place is held means claimed rows never wait in memory behind a busy lane.
        """
        with self._lock:
            if self._room(lane) <= 0:
                return False
            self._held[lane] += 1
            self._lane_running[lane] += 1
            return True

    def run_held(self, key: Hashable, lane: str, job: Job) -> None:
        """Run ``job`` in the place :meth:`hold` took for ``lane``, in a copy of the caller's context."""
        job = partial(contextvars.copy_context().run, job)
        with self._lock:
            self._held[lane] -= 1
            self._lane_running[lane] -= 1
            self._waiting[key] = (lane, job)
            self._start_what_fits(first=key)

    def release(self, lane: str) -> None:
        """Give back a place :meth:`hold` took and that is not needed after all."""
        with self._lock:
            self._held[lane] -= 1
            self._lane_running[lane] -= 1
            self._start_what_fits()

    # -- state ---------------------------------------------------------------------------------

    def busy(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._running or key in self._waiting

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits (tests, shutdown); True if that happened in time."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running and not self._waiting, timeout)

    # -- inside --------------------------------------------------------------------------------

    def _room(self, lane: str) -> int:
        free_threads = self.threads - len(self._running) - sum(self._held.values())
        return min(free_threads, self._lane_cap(lane) - self._lane_running[lane])

    def _start_what_fits(self, first: Hashable | None = None) -> None:
        """Start waiting jobs, oldest first, whose lane has room (called with the lock held)."""
        order = ([first] if first is not None else []) + [k for k in self._waiting if k != first]
        for key in order:
            lane, job = self._waiting[key]
            if self._room(lane) <= 0:
                continue
            del self._waiting[key]
            self._running[key] = lane
            self._lane_running[lane] += 1
            self._executor.submit(self._run, key, lane, job)

    def _run(self, key: Hashable, lane: str, job: Job) -> None:
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - a job's rows keep their leases; the sweep takes them again
            log_event("outbound.job.failed", logging.ERROR, exc_info=True, lane=lane, job=str(key),
                      error=type(exc).__name__)
        finally:
            with self._lock:
                del self._running[key]
                self._lane_running[lane] -= 1
                if key in self._again:
                    self._waiting[key] = self._again.pop(key)
                self._start_what_fits()
                if not self._running and not self._waiting:
                    self._idle.notify_all()


class InlineCourier:
    """``OUTBOUND_CONCURRENCY=0``: each call runs inside the task that claimed it, bounded by its
    deadline only, with no threads and no lanes; a job that asks to go :meth:`again` runs again at
    once, until it has nothing left. The shape the courier replaced, kept to measure it against
    (decision record 0009): a slow receiver holds the pool slot for its deadline, every attempt."""

    threads = 0

    def __init__(self) -> None:
        self._again: dict[Hashable, tuple[str, Job]] = {}

    def offer(self, key: Hashable, lane: str, job: Job) -> bool:
        self._run(key, lane, job)
        return True

    def again(self, key: Hashable, lane: str, job: Job) -> None:
        self._again[key] = (lane, job)

    def hold(self, lane: str) -> bool:
        return True

    def run_held(self, key: Hashable, lane: str, job: Job) -> None:
        self._run(key, lane, job)

    def release(self, lane: str) -> None:
        pass

    def busy(self, key: Hashable) -> bool:
        return False

    def wait_idle(self, timeout: float) -> bool:
        return True

    def _run(self, key: Hashable, lane: str, job: Job | None) -> None:
        while job is not None:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - as on the courier's threads
                log_event("outbound.job.failed", logging.ERROR, exc_info=True, lane=lane, job=str(key),
                          error=type(exc).__name__)
            lane, job = self._again.pop(key, (lane, None))


_couriers: dict[tuple, Courier | InlineCourier] = {}
_couriers_lock = threading.Lock()


def courier_for(settings: Settings) -> Courier | InlineCourier:
    """This process's courier, made on first use (after the pool's fork: threads do not survive one).

    Notifications, one shared provider, may use half the threads; an organization's endpoints
    ``WEBHOOKS_PER_ORGANIZATION`` of them. ``OUTBOUND_CONCURRENCY=0``: the :class:`InlineCourier`.
    """
    threads, per_organization = settings.outbound_concurrency, settings.webhooks_per_organization

    def lane_cap(lane: str) -> int:
        return max(1, threads // 2) if lane == NOTIFICATIONS_LANE else per_organization

    key = (os.getpid(), threads, per_organization)
    with _couriers_lock:
        courier = _couriers.get(key)
        if courier is None:
            _couriers.clear()
            courier = _couriers[key] = Courier(threads, lane_cap) if threads else InlineCourier()
        return courier
