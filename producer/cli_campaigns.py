"""CLI commands of retraining campaigns: ``progress-reset campaign create|confirm|list|pause|resume|delete|run-due``."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from models.errors import ValidationFailed
from producer.cli import command, emit, id_arg


def add_commands(sub) -> None:
    campaign = sub.add_parser("campaign", help="retraining campaigns: reset a course on a calendar")
    # Same one-line-error parser class as the top level.
    csub = campaign.add_subparsers(dest="campaign_command", required=True, parser_class=type(campaign))

    c = csub.add_parser("create", help="step 1: validate a campaign and get a summary and a confirmation token")
    c.add_argument("--actor", type=id_arg, required=True)
    c.add_argument("--course", type=id_arg, required=True)
    when = c.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="five-field cron expression in the campaign's time zone, e.g. '30 2 1 * *'")
    when.add_argument("--every-months", type=int, help="repeat every N months from --start")
    c.add_argument("--start", help="first occurrence of an --every-months schedule: YYYY-MM-DD (local midnight), "
                                   "a local YYYY-MM-DDTHH:MM, or an instant with an offset")
    c.add_argument("--time-zone", default=None, help="IANA time zone (default: the organization's)")
    c.add_argument("--completed-before-days", type=int, default=None,
                   help="only learners who completed the course more than N days before each occurrence "
                        "(default: every assigned learner with progress)")
    c.add_argument("--reason", default="")
    c.add_argument("--json", action="store_true")

    k = csub.add_parser("confirm", help="step 2: confirm a campaign with its token; it becomes active")
    k.add_argument("campaign_id", type=id_arg)
    k.add_argument("--actor", type=id_arg, required=True)
    k.add_argument("--token", required=True)
    k.add_argument("--json", action="store_true")

    ls = csub.add_parser("list", help="the campaigns of the actor's organization")
    ls.add_argument("--actor", type=id_arg, required=True)
    ls.add_argument("--course", type=id_arg, default=None)
    ls.add_argument("--all", action="store_true", help="include deleted campaigns")
    ls.add_argument("--json", action="store_true")

    for name, text in (("pause", "stop a campaign's occurrences until it is resumed"),
                       ("resume", "re-activate a paused campaign from its next occurrence"),
                       ("delete", "end a campaign for good (its history stays)")):
        p = csub.add_parser(name, help=text)
        p.add_argument("campaign_id", type=id_arg)
        p.add_argument("--actor", type=id_arg, required=True)
        p.add_argument("--json", action="store_true")

    r = csub.add_parser("run-due", help="run the dispatcher once: queue a reset job for every due occurrence")
    r.add_argument("--at", default=None, help="the instant to dispatch at, ISO-8601 (no offset means UTC); "
                                              "default: now")
    r.add_argument("--json", action="store_true")


def parse_instant(text: str) -> datetime:
    """An ISO-8601 instant for ``--at``; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationFailed(f"--at {text!r} is not an ISO-8601 date-time (e.g. 2025-03-31T01:00:00Z)") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # e.g. 9999-12-31T23:59-05:00 is in year 10000 in UTC
        raise ValidationFailed(f"--at {text!r} is out of range") from None


def _describe(view: dict) -> str:
    audience = ("every assigned learner" if view["audience"] == "all_assigned"
                else f"learners who completed more than {view['audience_days']} days before")
    nxt = view["next_occurrence_local"] or "-"
    last = view["last_occurrence"]
    line = (f"campaign {view['campaign_id']}: {view['state']}, course {view['course_id']}, {view['schedule']}, "
            f"{audience}; next {nxt}; {view['occurrences_done']} run")
    if last:
        line += f"; last {last['occurrence_at']} {last['outcome']}"
    return line


@command("campaign")
def cmd_campaign(args: argparse.Namespace) -> int:
    return _HANDLERS[args.campaign_command](args)


def _create(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import campaigns
    from producer.resets import plural

    with session_scope() as session:
        result = campaigns.request_campaign(
            session, args.actor, args.course, cron=args.cron, every_months=args.every_months, start=args.start,
            time_zone=args.time_zone, completed_before_days=args.completed_before_days, reason=args.reason,
            origin="cli",
        )
    s = result.summary
    human = (
        f"campaign {result.campaign_id}: {result.schedule}\n"
        f"  first occurrences (UTC): {', '.join(o.isoformat() for o in result.first_occurrences)}\n"
        f"  if it ran now it would reset {plural(s['learners'], 'learner')} ({plural(s['completions'], 'completion')}, "
        f"{plural(s['certificates'], 'certificate')}); {s['learners_to_notify']:,} would be notified; "
        "each reset cannot be undone\n"
        f"  confirm before {result.expires_at.isoformat()} with:\n"
        f"  progress-reset campaign confirm {result.campaign_id} --actor {args.actor} --token {result.token}"
    )
    emit(args, result.as_json(), human)
    return 0


def _confirm(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import campaigns

    with session_scope() as session:
        view = campaigns.confirm_campaign(session, args.actor, args.campaign_id, args.token, origin="cli")
    emit(args, view, _describe(view))
    return 0


def _list(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import campaigns

    with session_scope() as session:
        views = campaigns.list_campaigns(session, args.actor, course_id=args.course, include_deleted=args.all)
    emit(args, {"campaigns": views}, "\n".join(_describe(v) for v in views) or "no campaigns")
    return 0


def _change(action: str):
    def run(args: argparse.Namespace) -> int:
        from models.db import session_scope
        from producer import campaigns

        fn = {"pause": campaigns.pause_campaign, "resume": campaigns.resume_campaign,
              "delete": campaigns.delete_campaign}[action]
        with session_scope() as session:
            view = fn(session, args.actor, args.campaign_id, origin="cli")
        emit(args, view, _describe(view))
        return 0

    return run


def _run_due(args: argparse.Namespace) -> int:
    import workers  # noqa: F401 - configures the Celery app that resets.start is published through
    from models.db import session_scope
    from models.jobs import utcnow
    from tasks.campaigns import dispatch_due

    at = parse_instant(args.at) if args.at else utcnow()
    with session_scope() as session:
        result = dispatch_due(session, at)
    lines = [f"dispatched at {result.at.isoformat()}: {len(result.outcomes)} due, "
             f"{result.count('queued')} queued"]
    for o in result.outcomes:
        lines.append(f"  campaign {o.campaign_id} @ {o.occurrence_at.isoformat() if o.occurrence_at else '-'}: "
                     f"{o.outcome}" + (f" job {o.job_id}" if o.job_id else "")
                     + (f" ({o.detail})" if o.detail else ""))
    emit(args, result.as_json(), "\n".join(lines))
    return 0


_HANDLERS = {
    "create": _create,
    "confirm": _confirm,
    "list": _list,
    "pause": _change("pause"),
    "resume": _change("resume"),
    "delete": _change("delete"),
    "run-due": _run_due,
}
