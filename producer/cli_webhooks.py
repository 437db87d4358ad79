"""CLI commands ``webhook create|list|show|delete|rotate-secret|deliveries|redeliver``.

The same functions as ``/v1/webhooks``; the organization is named with
``--organization`` (the HTTP API takes it from the API key).
"""

from __future__ import annotations

import click

from models.job_events import EVENT_TYPES
from producer.cli_parameters import ID, PAGE_LIMIT, WHOLE, Group, OneOf, emit, json_option, option
from producer.pages import DEFAULT_LIMIT

organization_option = option("--organization", type=ID, required=True, help="The organization the receiver belongs to.")
endpoint_argument = click.argument("endpoint_id", type=ID, help="The receiver's id, as 'webhook list' shows it.")


@click.group("webhook", cls=Group)
def webhook() -> None:
    """Receivers of job events (signed webhooks)."""


def _line(ep: dict) -> str:
    return f"webhook {ep['id']}: {ep['url']} ({', '.join(ep['events'])})"


def _session():
    from models.db import session_scope

    return session_scope()


@webhook.command("create")
@organization_option
@option("--url", required=True, help="Where the events are POSTed (https).")
@option("--event", "events", type=OneOf(EVENT_TYPES), multiple=True, required=True,
        help="An event to receive (repeatable).")
@json_option
def create(organization: int, url: str, events: tuple[str, ...], as_json: bool) -> int:
    """Register a receiver; the signing secret is shown once."""
    from producer import webhooks

    with _session() as session:
        ep = webhooks.create_endpoint(session, organization, url, list(events))
    emit(as_json, ep, _line(ep) + f"\n  secret (shown once): {ep['secret']}")
    return 0


@webhook.command("list")
@organization_option
@json_option
def list_endpoints(organization: int, as_json: bool) -> int:
    """The organization's receivers (never their secrets)."""
    from producer import webhooks

    with _session() as session:
        items = webhooks.list_endpoints(session, organization)
    emit(as_json, {"items": items}, "\n".join(_line(ep) for ep in items) or "no webhook endpoints")
    return 0


def _endpoint_command(name: str, summary: str, function_name: str, done: str = "") -> None:
    """``webhook show|delete ENDPOINT_ID --organization ID``: one receiver, read or deleted."""

    @webhook.command(name, help=summary)
    @endpoint_argument
    @organization_option
    @json_option
    def one_endpoint(endpoint_id: int, organization: int, as_json: bool) -> int:
        from producer import webhooks

        with _session() as session:
            ep = getattr(webhooks, function_name)(session, organization, endpoint_id)
        emit(as_json, ep, _line(ep) + done)
        return 0


_endpoint_command("show", "One receiver.", "get_endpoint")
_endpoint_command("delete", "Stop sending to a receiver; open deliveries are cancelled.", "delete_endpoint",
                  " deleted")


@webhook.command("rotate-secret")
@endpoint_argument
@organization_option
@option("--overlap-seconds", type=WHOLE, default=24 * 3600, help="How long the old secret also signs.")
@json_option
def rotate_secret(endpoint_id: int, organization: int, overlap_seconds: int, as_json: bool) -> int:
    """A new secret; the old one also signs during the overlap."""
    from producer import webhooks

    with _session() as session:
        ep = webhooks.rotate_secret(session, organization, endpoint_id, overlap_seconds)
    emit(as_json, ep, _line(ep) + f"\n  new secret (shown once): {ep['secret']}; the old one signs until "
                                  f"{ep['previous_secret_expires_at'] or 'now'}")
    return 0


@webhook.command("deliveries")
@endpoint_argument
@organization_option
@option("--status", multiple=True, help="Only deliveries in this status, e.g. failed (repeatable: any of them).")
@option("--limit", type=PAGE_LIMIT, default=DEFAULT_LIMIT, help="Deliveries per page.")
@option("--cursor", default=None, help="The next_cursor of the previous page.")
@json_option
def deliveries(endpoint_id: int, organization: int, status: tuple[str, ...], limit: int, cursor: str | None,
               as_json: bool) -> int:
    """A receiver's delivery log, newest first."""
    from producer import webhooks

    with _session() as session:
        page = webhooks.list_deliveries(session, organization, endpoint_id, status=status, limit=limit,
                                        cursor=cursor)
    lines = [f"{x['delivery_id']}  {x['event_type']:<16} {x['status']:<10} attempts {x['attempts']}  "
             f"last {x['last_status_code'] or '-'}  job {x['job_id']}" for x in page["items"]]
    if page["next_cursor"]:
        lines.append(f"more: --cursor {page['next_cursor']}")
    emit(as_json, page, "\n".join(lines) or "no deliveries")
    return 0


@webhook.command("redeliver")
@endpoint_argument
@click.argument("delivery_id", type=ID, help="The delivery to send again, as 'webhook deliveries' shows it.")
@organization_option
@json_option
def redeliver(endpoint_id: int, delivery_id: int, organization: int, as_json: bool) -> int:
    """Send a finished delivery again (same event id)."""
    from producer import webhooks

    with _session() as session:
        x = webhooks.redeliver(session, organization, endpoint_id, delivery_id)
    emit(as_json, x, f"delivery {x['delivery_id']} ({x['event_type']}) queued again")
    return 0


COMMANDS = (webhook,)
