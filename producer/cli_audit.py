"""CLI command ``audit export``: an organization's audit trail as JSON lines or CSV, streamed.

Compliance exports can be any size, so events are written as they are read, in
constant memory, to stdout or a file.
"""

from __future__ import annotations

import click

from producer.cli_parameters import ID, Group, OneOf, option
from producer.output import write_output


@click.group("audit", cls=Group)
def audit() -> None:
    """The audit trail."""


@audit.command("export")
@option("--organization", type=ID, required=True, help="The organization whose events are exported.")
@option("--from", "date_from", required=True, help="ISO-8601 date or date-time, inclusive.")
@option("--to", "date_to", required=True, help="ISO-8601 date or date-time, exclusive.")
@option("--format", "fmt", type=OneOf(("jsonl", "csv")), default="jsonl", help="JSON lines or CSV.")
@option("--action", multiple=True, help="Only this action, e.g. reset.succeeded (repeatable: any of them).")
@option("--course", type=ID, multiple=True, help="Only events of this course (repeatable).")
@option("--output", default=None, help="Write to this file instead of standard output.")
def export(organization: int, date_from: str, date_to: str, fmt: str, action: tuple[str, ...],
           course: tuple[int, ...], output: str | None) -> int:
    """Stream an organization's audit events (any size, constant memory)."""
    from models.db import session_scope
    from producer import audit as audit_trail

    with session_scope() as session:
        # Validated before anything is written: a refusal leaves no half-written file.
        chunks = audit_trail.export_events(session, organization, date_from=date_from, date_to=date_to,
                                           action=action, course_id=course, fmt=fmt)
        write_output(output, chunks)
    return 0


COMMANDS = (audit,)
