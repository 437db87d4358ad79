"""Issue 18, CLI findings: docs that differ from behaviour (item 8: beat in the README, ``--limit``).

Real PostgreSQL and the real ``progress-reset`` CLI, in this process through click's ``CliRunner``.
"""

from __future__ import annotations

from pathlib import Path

from models.db import session_scope
from models.queues import QUEUES
from models.settings import get_settings
from producer import webhooks
from tests.test_cli_foundation import invoke
from tests.test_issue13_cli import assert_refused, tenant  # noqa: F401 - fixture
from workers.config import TASK_ROUTES, celery_config

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- item 8: docs that differ from behaviour -------------------------------------------------------

def test_item8_readme_by_hand_starts_beat_which_schedules_the_sweep():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Trying it by hand", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    beats = [c for c in commands if "celery -A workers beat" in c]
    assert len(beats) == 1, commands  # exactly one beat
    worker = next(c for c in commands if "celery -A workers worker" in c)
    consumed = set(worker.split(" -Q ", 1)[1].split()[0].split(","))
    assert consumed == set(QUEUES)
    # What beat schedules is consumed by that worker, and the text says what is lost without it.
    scheduled = {entry["task"] for entry in celery_config(get_settings())["beat_schedule"].values()}
    assert scheduled == {"maintenance.sweep", "campaigns.dispatch_due"}
    assert {TASK_ROUTES[name]["queue"] for name in scheduled} <= consumed
    assert "maintenance.sweep" in section and "stays `queued`" in section


def test_item8_limit_help_shows_the_range_the_command_accepts(tenant, use_env):
    use_env(WEBHOOKS_ALLOW_HTTP_LOOPBACK="true")
    with session_scope() as session:
        endpoint = webhooks.create_endpoint(session, tenant.organization_id, "http://127.0.0.1:9/hook",
                                            ["reset.succeeded"])["id"]
    listings = {
        ("jobs", "list"): ["--organization", str(tenant.organization_id)],
        ("webhook", "deliveries"): [str(endpoint), "--organization", str(tenant.organization_id)],
        ("dead-batches",): [],
    }
    for command, args in listings.items():
        helped = invoke(*command, "--help")
        line = " ".join(helped.stdout.split("--limit", 1)[1].split("--", 1)[0].split())
        highest = int(line.split("1<=x<=", 1)[1].split("]", 1)[0])
        ok = invoke(*command, *args, "--limit", str(highest), "--json")
        assert ok.returncode == 0, (command, ok.stderr)
        assert_refused(invoke(*command, *args, "--limit", str(highest + 1)), "--limit",
                       f"must be at most {highest}")
        if command != ("dead-batches",):
            assert highest == 200, (command, line)  # the page size every listing accepts
