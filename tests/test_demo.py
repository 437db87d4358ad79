"""The demo (``make demo``) on the embedded default: SQLite, the filesystem broker, real worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Variables that would point the demo away from the embedded default.
NOT_EMBEDDED = ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "NOTIFY_CONSOLE_PATH", "RESET_BATCH_SIZE")

pytestmark = pytest.mark.e2e


def test_the_demo_resets_a_course_end_to_end_on_the_embedded_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in NOT_EMBEDDED}
    env["PROGRESS_RESET_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--learners", "3000", "--json"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["state"] == "succeeded"
    assert summary["analytics_exact"] and summary["other_course_untouched"]
    assert summary["completion_rate_before"] > 0 and summary["completion_rate_after"] == 0
    assert summary["learners_reset"] > 1000
    # Rows of every kind were cleared.
    assert all(rows > 0 for rows in summary["cleared"].values()), summary["cleared"]
    assert summary["notifications"]["pending"] == 0 and summary["notifications"]["sent"] > 0
    assert (tmp_path / "data" / "progress_reset.db").exists()
