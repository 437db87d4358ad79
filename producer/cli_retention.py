"""CLI command ``retention``: what the retention sweep would remove now, per table; ``--apply`` removes it.

The same predicates and chunks as the ``maintenance.retention`` task (:mod:`models.retention`):
a dry run counts, an apply removes chunk after chunk, each its own short transaction, until
nothing is left. Interrupted, it keeps the chunks it committed; run it again to go on.
"""

from __future__ import annotations

import time

import click

from models.retention import NEVER_REMOVED, TABLES, Policy
from producer.cli_parameters import Command, emit, json_option, option


def describe(policy: Policy, rows: dict[str, int], applied: bool, seconds: float | None) -> tuple[dict, str]:
    """The report as JSON and as text: per table its window, the instant it counts from, and the rows."""
    tables = {table: {"days": policy.days[table], "before": policy.before(table).isoformat(), "rows": rows[table]}
              for table in TABLES}
    payload = {"applied": applied, "at": policy.now.isoformat(), "tables": tables,
               "never_removed": list(NEVER_REMOVED), "seconds": None if seconds is None else round(seconds, 3)}
    verb = "removed" if applied else "would remove"
    lines = [f"{'table':<20} {'keeps':>9}  {'finished before':<26} {verb:>13}"]
    for table, entry in tables.items():
        lines.append(f"{table:<20} {entry['days']:>4} days  {entry['before'][:19]:<26} {entry['rows']:>13,}")
    for table in NEVER_REMOVED:
        lines.append(f"{table:<20} {'forever':>9}  {'(append-only, R5)':<26} {0:>13}")
    if applied:
        lines.append(f"removed in {seconds:.1f}s")
    else:
        lines.append("dry run: nothing removed; run with --apply to remove it")
    return payload, "\n".join(lines)


@click.command("retention", cls=Command)
@option("--apply", is_flag=True, help="Remove it now, in chunks of RETENTION_CHUNK_ROWS rows, each its own "
                                      "transaction (default: only count).")
@json_option
def retention(apply: bool, as_json: bool) -> int:
    """What retention removes now, per table (finished rows past their RETENTION_*_DAYS); --apply removes it."""
    from models.db import session_scope
    from models.times import utcnow
    from models.retention import remove_chunk, removable_counts, start_sweep
    from models.settings import get_settings

    sweep = start_sweep(utcnow(), get_settings())
    if not apply:
        with session_scope() as session:
            rows = removable_counts(session, sweep.policy)
        emit(as_json, *describe(sweep.policy, rows, False, None))
        return 0
    started = time.perf_counter()
    more = True
    while more:
        with session_scope() as session:
            more = remove_chunk(session, sweep)
    emit(as_json, *describe(sweep.policy, sweep.report(), True, time.perf_counter() - started))
    return 0


COMMANDS = (retention,)
