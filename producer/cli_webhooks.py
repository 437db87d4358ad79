"""CLI commands ``webhook create|list|show|delete|rotate-secret|deliveries|redeliver``.

The same functions as ``/v1/webhooks``; the organization is named with
``--organization`` (the HTTP API takes it from the API key).
"""

from __future__ import annotations

import argparse

from producer.cli import command, emit, id_arg


def add_commands(sub) -> None:
    from models.webhooks import EVENT_TYPES

    w = sub.add_parser("webhook", help="receivers of job events (signed webhooks)")
    wsub = w.add_subparsers(dest="webhook_command", required=True, parser_class=type(w))
    c = wsub.add_parser("create", help="register a receiver; the signing secret is shown once")
    c.add_argument("--organization", type=id_arg, required=True)
    c.add_argument("--url", required=True)
    c.add_argument("--event", dest="events", action="append", required=True, choices=EVENT_TYPES,
                   help="an event to receive (repeatable)")
    c.add_argument("--json", action="store_true")
    ls = wsub.add_parser("list", help="the organization's receivers (never their secrets)")
    ls.add_argument("--organization", type=id_arg, required=True)
    ls.add_argument("--json", action="store_true")
    for name, text in (("show", "one receiver"), ("delete", "stop sending to a receiver; open deliveries are "
                                                                "cancelled")):
        p = wsub.add_parser(name, help=text)
        p.add_argument("endpoint_id", type=id_arg)
        p.add_argument("--organization", type=id_arg, required=True)
        p.add_argument("--json", action="store_true")
    r = wsub.add_parser("rotate-secret", help="a new secret; the old one also signs during the overlap")
    r.add_argument("endpoint_id", type=id_arg)
    r.add_argument("--organization", type=id_arg, required=True)
    r.add_argument("--overlap-seconds", type=int, default=24 * 3600)
    r.add_argument("--json", action="store_true")
    d = wsub.add_parser("deliveries", help="a receiver's delivery log, newest first")
    d.add_argument("endpoint_id", type=id_arg)
    d.add_argument("--organization", type=id_arg, required=True)
    d.add_argument("--status", default=None)
    d.add_argument("--limit", type=id_arg, default=50)
    d.add_argument("--cursor", default=None)
    d.add_argument("--json", action="store_true")
    rd = wsub.add_parser("redeliver", help="send a finished delivery again (same event id)")
    rd.add_argument("endpoint_id", type=id_arg)
    rd.add_argument("delivery_id", type=id_arg)
    rd.add_argument("--organization", type=id_arg, required=True)
    rd.add_argument("--json", action="store_true")


def _line(ep: dict) -> str:
    return f"webhook {ep['id']}: {ep['url']} ({', '.join(ep['events'])})"


@command("webhook")
def cmd_webhook(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import webhooks

    with session_scope() as session:
        what = args.webhook_command
        if what == "create":
            ep = webhooks.create_endpoint(session, args.organization, args.url, args.events)
            emit(args, ep, _line(ep) + f"\n  secret (shown once): {ep['secret']}")
        elif what == "list":
            items = webhooks.list_endpoints(session, args.organization)
            emit(args, {"items": items}, "\n".join(_line(ep) for ep in items) or "no webhook endpoints")
        elif what == "show":
            ep = webhooks.get_endpoint(session, args.organization, args.endpoint_id)
            emit(args, ep, _line(ep))
        elif what == "delete":
            ep = webhooks.delete_endpoint(session, args.organization, args.endpoint_id)
            emit(args, ep, _line(ep) + " deleted")
        elif what == "rotate-secret":
            ep = webhooks.rotate_secret(session, args.organization, args.endpoint_id, args.overlap_seconds)
            emit(args, ep, _line(ep) + f"\n  new secret (shown once): {ep['secret']}; the old one signs until "
                                       f"{ep['previous_secret_expires_at'] or 'now'}")
        elif what == "deliveries":
            page = webhooks.list_deliveries(session, args.organization, args.endpoint_id, status=args.status,
                                            limit=args.limit, cursor=args.cursor)
            lines = [f"{x['delivery_id']}  {x['event_type']:<16} {x['status']:<10} attempts {x['attempts']}  "
                     f"last {x['last_status_code'] or '-'}  job {x['job_id']}" for x in page["items"]]
            if page["next_cursor"]:
                lines.append(f"more: --cursor {page['next_cursor']}")
            emit(args, page, "\n".join(lines) or "no deliveries")
        else:
            x = webhooks.redeliver(session, args.organization, args.endpoint_id, args.delivery_id)
            emit(args, x, f"delivery {x['delivery_id']} ({x['event_type']}) queued again")
    return 0
