"""CLI command ``audit export``: an organization's audit trail as JSON lines or CSV, streamed."""

from __future__ import annotations

import argparse
import sys

from producer.cli import command, id_arg


def add_commands(sub) -> None:
    au = sub.add_parser("audit", help="the audit trail")
    asub = au.add_subparsers(dest="audit_command", required=True, parser_class=type(au))
    ex = asub.add_parser("export", help="stream an organization's audit events (any size, constant memory)")
    ex.add_argument("--organization", type=id_arg, required=True)
    ex.add_argument("--from", dest="date_from", required=True, help="ISO-8601 date or date-time, inclusive")
    ex.add_argument("--to", dest="date_to", required=True, help="ISO-8601 date or date-time, exclusive")
    ex.add_argument("--format", dest="fmt", choices=("jsonl", "csv"), default="jsonl")
    ex.add_argument("--action", default=None, help="only this action, e.g. reset.succeeded")
    ex.add_argument("--course", type=id_arg, default=None)
    ex.add_argument("--output", default=None, help="write to this file instead of standard output")


@command("audit")
def cmd_audit(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import audit

    with session_scope() as session:
        # Validated before anything is written: a refusal leaves no half-written file.
        chunks = audit.export_events(session, args.organization, date_from=args.date_from, date_to=args.date_to,
                                     action=args.action, course_id=args.course, fmt=args.fmt)
        out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
        try:
            for chunk in chunks:
                out.write(chunk)
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
    return 0
