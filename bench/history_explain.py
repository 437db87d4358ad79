"""EXPLAIN (ANALYZE, BUFFERS) of every query that runs often and could slow down as history grows.

Each scenario calls the project's own function (the fair pick, the notification claim and sweep,
the webhook claim and sweep, the maintenance sweep, the job list and status, the audit export,
the metrics scrape, a retention chunk) inside a transaction that is rolled back, records the
statements it sends, and runs them again, in order, each under ``EXPLAIN (ANALYZE, BUFFERS)``,
in a transaction of its own, also rolled back: the plan and its time on that database, nothing
changed.

    python -m bench.history_explain DATABASE_URL BUSIEST_ORGANIZATION BUSIEST_ENDPOINT
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from bench import common

TABLES = ("reset_jobs", "reset_batches", "notifications", "webhook_deliveries", "webhook_events", "audit_events",
          "organization_turns", "pruned_notifications")
EXECUTION = re.compile(r"Execution Time: ([\d.]+) ms")
LONG_ARRAY = re.compile(r"'\{[^}]{120,}\}'")


def _abridged(line: str) -> str:
    """A plan line with an array parameter of many ids shortened (the ids say nothing)."""
    return LONG_ARRAY.sub(lambda m: f"'{{…{m.group(0).count(',') + 1} values…}}'", line)


def scenarios(session: Session, organization_id: int, endpoint_id: int) -> list[tuple[str, Callable]]:
    """(name, call) for each query family, with ids read from the database it runs on."""
    from models.retention import STEPS, Sweep, Policy, remove_chunk
    from models.settings import get_settings
    from producer import audit, resets
    from producer.metrics import read_snapshot
    from tasks import maintenance
    from tasks.notifications import outbox
    from tasks.notifications.sending import claim_lease_seconds
    from tasks.resets import turns
    from tasks.webhooks.deliveries import claim_next_delivery
    from tasks.webhooks.sweep import sweep_webhooks
    from tasks.webhooks.wakeups import next_wake

    now = datetime.now(timezone.utc)
    settings = get_settings()
    lease = claim_lease_seconds(settings)
    live = session.scalar(text("SELECT id FROM reset_jobs WHERE state = 'running' ORDER BY created_at LIMIT 1"))
    live = live or uuid.uuid4()
    latest = session.scalar(text("SELECT id FROM reset_jobs WHERE organization_id = :o ORDER BY created_at DESC "
                                 "LIMIT 1"), {"o": organization_id})
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month = ((first - timedelta(days=1)).replace(day=1), first)

    def chunk(step: str) -> Callable:
        def remove(s: Session):
            sweep = Sweep(Policy.at(now, settings), settings.retention_chunk_rows)
            sweep.finished = set(STEPS) - {step}
            return remove_chunk(s, sweep)
        return remove

    return [
        ("fair pick: the queued job to start", lambda s: turns.next_queued_job(s)),
        ("fair pick: the unit to run", lambda s: turns.claim_next_unit(s, 5, 60, now)),
        ("notification claim, one job", lambda s: outbox.claim_notifications(s, live, 50, lease, settings.notify_max_attempts, now)),
        ("notification claim, any job", lambda s: outbox.claim_notifications(s, None, 50, lease, settings.notify_max_attempts, now)),
        ("notification next due", lambda s: outbox.next_due_at(s, None, lease)),
        ("notification sweep", lambda s: outbox.sweep_notifications(s, lease, now, settings)),
        ("webhook claim, busiest endpoint", lambda s: claim_next_delivery(s, endpoint_id, now)),
        ("webhook next wake, busiest endpoint", lambda s: next_wake(s, endpoint_id, now)),
        ("webhook sweep", lambda s: sweep_webhooks(s, now)),
        ("maintenance sweep (the rest)", lambda s: maintenance.sweep(s, now)),
        ("job list, first page, busiest organization",
         lambda s: resets.list_jobs(s, organization_id, limit=50)),
        ("job status", lambda s: latest and resets.status(s, str(latest))),
        ("audit export, busiest organization, one month",
         lambda s: sum(1 for _ in audit.export_events(s, organization_id, date_from=month[0], date_to=month[1]))),
        ("metrics scrape", lambda s: read_snapshot(s, now)),
        *[(f"retention chunk: {step}", chunk(step)) for step in STEPS],
    ]


def explain_all(url: str, info: dict, seeded: dict) -> list[dict]:
    """The plans on ``url``: ``[{"scenario", "statement", "ms", "plan"}]``, each statement once."""
    from models.db import dispose_engine, get_engine

    common.configure(url)
    dispose_engine()
    engine = get_engine()
    captured: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if not executemany and any(t in statement for t in TABLES) and not statement.startswith("EXPLAIN"):
            captured.append((statement, parameters))

    results, seen = [], set()
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        calls = scenarios(session, seeded["busiest_organization"], seeded["busiest_endpoint"])
        outer.rollback()
    for name, call in calls:
        captured.clear()
        with engine.connect() as conn:
            outer = conn.begin()
            event.listen(engine, "before_cursor_execute", capture)
            try:
                call(Session(bind=conn, join_transaction_mode="create_savepoint"))
            finally:
                event.remove(engine, "before_cursor_execute", capture)
                outer.rollback()
        # Replayed in order in one transaction (a statement may need what an earlier one did), rolled back.
        with engine.connect() as conn:
            outer = conn.begin()
            cursor = conn.connection.driver_connection.cursor()
            for statement, params in list(captured):
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
                plan = [_abridged(row[0]) for row in cursor.fetchall()]
                key = " ".join(statement.split())
                if key in seen:
                    continue
                seen.add(key)
                found = next((EXECUTION.search(line) for line in plan if EXECUTION.search(line)), None)
                results.append({"scenario": name, "statement": key, "ms": float(found.group(1)) if found else None,
                                "plan": plan})
            outer.rollback()
    dispose_engine()
    return results


def print_plans(plans: list[dict], slower_than_ms: float = 0.0) -> None:
    for p in plans:
        if (p["ms"] or 0) >= slower_than_ms:
            print(f"-- {p['scenario']}: {p['ms']} ms\n-- {p['statement'][:300]}")
            print("\n".join("   " + line for line in p["plan"]))
            print()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.history_explain DATABASE_URL BUSIEST_ORGANIZATION BUSIEST_ENDPOINT",
              file=sys.stderr)
        return 2
    print_plans(explain_all(argv[0], {}, {"busiest_organization": int(argv[1]), "busiest_endpoint": int(argv[2])}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
