"""The outside world: one tenant's webhook receivers trickle while another tenant works.

    python -m bench --burst            (runs with the burst scenario, on both topologies)

On the burst scenario's base, organization A registers ``RECEIVERS`` webhook endpoints whose
receivers answer ``200`` with a ``Content-Length`` and then one byte every two seconds, and
starts ``A_RESETS`` course resets (each job's events go to every endpoint: every attempt holds
until its deadline). Meanwhile organization B resets single learners one after another for
``WINDOW_SECONDS``; reported: their latencies (confirm to succeeded), p95 and max, and how many
deliveries were held open at once while they ran. Default settings throughout, but for
``WEBHOOKS_ALLOW_HTTP_LOOPBACK`` (the receivers are on loopback).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import common
from bench.receivers import BadReceiver

RECEIVERS = 4
A_RESETS = 6
WINDOW_SECONDS = 30.0
TRICKLE_EVERY = 2.0


def run_slow_receivers(base: str, info: dict, topology: str, log_dir: Path) -> dict:
    """B's one-learner latencies while A's receivers trickle, on ``topology``."""
    from bench import burst

    a, b = info["a"], info["b"]
    receivers = [BadReceiver("trickle", every=TRICKLE_EVERY).start() for _ in range(RECEIVERS)]
    env, procs, api = burst.fresh_system(base, info, topology, log_dir,
                                         {"WEBHOOKS_ALLOW_HTTP_LOOPBACK": "true"})
    try:
        for receiver in receivers:
            created = api.client.post("/v1/webhooks", json={"url": receiver.url,
                                                            "events": ["reset.confirmed", "reset.succeeded"]},
                                      headers={"X-API-Key": info["key_a"]})
            created.raise_for_status()
        a_jobs = [api.confirm(info["key_a"], a["admin_id"], api.request(info["key_a"], a["admin_id"], course))
                  for course in a["course_ids"][-A_RESETS:]]
        deadline = time.monotonic() + 10
        while sum(r.open for r in receivers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the first attempts are holding their connections
        held = []
        latencies: list[float] = []
        course = b["course_ids"][1]
        stop_at = time.monotonic() + WINDOW_SECONDS
        for learner in burst.learners_with_progress(course):
            if time.monotonic() > stop_at:
                break
            held.append(sum(r.open for r in receivers))
            req = api.request(info["key_b"], b["admin_id"], course, learner)
            t0 = burst.now()
            job = api.confirm(info["key_b"], b["admin_id"], req)
            done = burst.finished_at([job], timeout=120)[job]
            latencies.append((done - t0).total_seconds() * 1000)
        burst.finished_at(a_jobs)
    finally:
        burst.stop_system(procs, api)
        for receiver in receivers:
            receiver.stop()
    result = {"single_ms": latencies, "p95_ms": common.percentile(latencies, 0.95), "max_ms": max(latencies),
              "held_open_median": sorted(held)[len(held) // 2] if held else 0,
              "receiver_requests": sum(len(r.got()) for r in receivers),
              "most_open_at_once": max(r.most_open for r in receivers)}
    common.log(f"{topology}: slow receivers: B one-learner p95 {result['p95_ms']:.0f} ms, max "
               f"{result['max_ms']:.0f} ms over {len(latencies)} resets, {result['held_open_median']} deliveries "
               f"held open meanwhile (median), {result['receiver_requests']} attempts received")
    return result
