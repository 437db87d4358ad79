"""CLI commands of retraining campaigns: ``progress-reset campaign create|confirm|list|pause|resume|delete|run-due``.

A campaign is created and confirmed in two steps like a reset; ``run-due`` runs
the dispatcher once by hand (beat runs it every minute), at an instant of
choice so a schedule can be tried out.
"""

from __future__ import annotations

from datetime import datetime, timezone

import click

from models.states import OccurrenceState
from producer.cli_parameters import ID, WHOLE, Group, RefusedValue, emit, json_option, option


class Instant(click.ParamType):
    """An ISO-8601 instant, converted to UTC; without an offset it is UTC.

    A refused instant exits 1, not 2: it is input the dispatcher turns down,
    and scripts that run ``run-due`` tell it from a wrong command line.
    """

    name = "instant"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "ISO-8601"

    def convert(self, value, param, ctx) -> datetime | None:
        if isinstance(value, datetime):
            return value
        if not value.strip():
            return None  # "--at ''": now, as without --at
        try:
            instant = datetime.fromisoformat(value.strip())
        except ValueError:
            raise RefusedValue(f"expected an ISO-8601 date-time (e.g. 2025-03-31T01:00:00Z), got {value!r}",
                               ctx, param) from None
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=timezone.utc)
        try:
            return instant.astimezone(timezone.utc)
        except OverflowError:  # e.g. 9999-12-31T23:59-05:00 is in year 10000 in UTC
            raise RefusedValue(f"out of range (past the year 9999 in UTC), got {value!r}", ctx, param) from None


@click.group("campaign", cls=Group)
def campaign() -> None:
    """Retraining campaigns: reset a course on a calendar."""


@campaign.command("create", one_of=("--cron", "--every-months"))
@option("--actor", type=ID, required=True, help="The admin creating the campaign.")
@option("--course", type=ID, required=True, help="The course the campaign resets.")
@option("--cron", default=None, help="Five-field cron expression in the campaign's time zone, e.g. '30 2 1 * *'.")
@option("--every-months", type=WHOLE, default=None, help="Repeat every N months from --start.")
@option("--start", default=None, help="First occurrence of an --every-months schedule: YYYY-MM-DD (local midnight), "
                                      "a local YYYY-MM-DDTHH:MM, or an instant with an offset.")
@option("--time-zone", default=None, help="IANA time zone (default: the organization's).")
@option("--completed-before-days", type=WHOLE, default=None,
        help="Only learners who completed the course more than N days before each occurrence "
             "(default: every assigned learner with progress).")
@option("--reason", default="", show_default=False, help="Why, for the audit trail.")
@json_option
def create(actor: int, course: int, cron: str | None, every_months: int | None, start: str | None,
           time_zone: str | None, completed_before_days: int | None, reason: str, as_json: bool) -> int:
    """Step 1: validate a campaign and get a summary and a confirmation token."""
    from models.db import session_scope
    from producer import campaigns
    from producer.resets import plural

    with session_scope() as session:
        result = campaigns.request_campaign(
            session, actor, course, cron=cron, every_months=every_months, start=start, time_zone=time_zone,
            completed_before_days=completed_before_days, reason=reason, origin="cli",
        )
    s = result.summary
    human = (
        f"campaign {result.campaign_id}: {result.schedule}\n"
        f"  first occurrences (UTC): {', '.join(o.isoformat() for o in result.first_occurrences)}\n"
        f"  if it ran now it would reset {plural(s['learners'], 'learner')} ({plural(s['completions'], 'completion')}, "
        f"{plural(s['certificates'], 'certificate')}); {s['learners_to_notify']:,} would be notified; "
        "each reset cannot be undone\n"
        f"  confirm before {result.expires_at.isoformat()} with:\n"
        f"  progress-reset campaign confirm {result.campaign_id} --actor {actor} --token {result.token}"
    )
    emit(as_json, result.as_json(), human)
    return 0


@campaign.command("confirm")
@click.argument("campaign_id", type=ID, help="The campaign_id that 'campaign create' printed.")
@option("--actor", type=ID, required=True, help="The admin who created the campaign.")
@option("--token", required=True, help="The confirmation token that 'campaign create' printed.")
@json_option
def confirm(campaign_id: int, actor: int, token: str, as_json: bool) -> int:
    """Step 2: confirm a campaign with its token; it becomes active."""
    from models.db import session_scope
    from producer import campaigns

    with session_scope() as session:
        view = campaigns.confirm_campaign(session, actor, campaign_id, token, origin="cli")
    emit(as_json, view, _describe(view))
    return 0


@campaign.command("list")
@option("--actor", type=ID, required=True, help="An admin; the campaigns of their organization are listed.")
@option("--course", type=ID, default=None, help="Only campaigns of this course.")
@option("--all", "include_deleted", is_flag=True, help="Include deleted campaigns.")
@json_option
def list_campaigns(actor: int, course: int | None, include_deleted: bool, as_json: bool) -> int:
    """The campaigns of the actor's organization."""
    from models.db import session_scope
    from producer import campaigns

    with session_scope() as session:
        views = campaigns.list_campaigns(session, actor, course_id=course, include_deleted=include_deleted)
    emit(as_json, {"campaigns": views}, "\n".join(_describe(v) for v in views) or "no campaigns")
    return 0


def _state_change(name: str, summary: str, function_name: str) -> None:
    """``campaign pause|resume|delete CAMPAIGN_ID --actor ID``: one change of state."""

    @campaign.command(name, help=summary)
    @click.argument("campaign_id", type=ID, help="The campaign to change.")
    @option("--actor", type=ID, required=True, help="An admin of the campaign's organization.")
    @json_option
    def change(campaign_id: int, actor: int, as_json: bool) -> int:
        from models.db import session_scope
        from producer import campaigns

        with session_scope() as session:
            view = getattr(campaigns, function_name)(session, actor, campaign_id, origin="cli")
        emit(as_json, view, _describe(view))
        return 0


_state_change("pause", "Stop a campaign's occurrences until it is resumed.", "pause_campaign")
_state_change("resume", "Re-activate a paused campaign from its next occurrence.", "resume_campaign")
_state_change("delete", "End a campaign for good (its history stays).", "delete_campaign")


@campaign.command("run-due")
@option("--at", type=Instant(), default=None, show_default="now",
        help="The instant to dispatch at, ISO-8601 (no offset means UTC).")
@json_option
def run_due(at: datetime | None, as_json: bool) -> int:
    """Run the dispatcher once: queue a reset job for every due occurrence."""
    from models.campaign_dispatch import dispatch_due
    from models.db import session_scope
    from models.times import utcnow

    with session_scope() as session:
        result = dispatch_due(session, at or utcnow())
    lines = [f"dispatched at {result.at.isoformat()}: {len(result.outcomes)} due, "
             f"{result.count(OccurrenceState.QUEUED)} queued"]
    for o in result.outcomes:
        lines.append(f"  campaign {o.campaign_id} @ {o.occurrence_at.isoformat() if o.occurrence_at else '-'}: "
                     f"{o.outcome}" + (f" job {o.job_id}" if o.job_id else "")
                     + (f" ({o.detail})" if o.detail else ""))
    emit(as_json, result.as_json(), "\n".join(lines))
    return 0


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


COMMANDS = (campaign,)
