"""The one backoff of the project's own retries: failed units, notification rows, webhook deliveries."""

from __future__ import annotations

import random


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """``min(cap, base * 2**(attempt-1))``, of which the upper half is random (equal jitter), so
    workers retrying after one outage do not come back in step."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
