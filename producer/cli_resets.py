"""CLI commands of the reset flow: request, confirm, status (with ``--watch``), cancel, demo, and ``jobs list``.

The same two confirmed steps as the HTTP API: ``request`` shows what a reset
would clear and hands out a token, ``confirm`` queues the job.
"""

from __future__ import annotations

import click

from models.states import JobState
from producer.cli_parameters import COUNT, ID, NUMBER, PAGE_LIMIT, Command, Group, emit, json_option, option
from producer.pages import DEFAULT_LIMIT
from producer.watch import read_status, watch


@click.command("request", cls=Command)
@option("--actor", type=ID, required=True, help="The admin asking for the reset.")
@option("--course", type=ID, required=True, help="The course whose progress is reset.")
@option("--learner", type=ID, default=None, help="Reset one learner (default: every learner with progress).")
@option("--reason", default="", show_default=False, help="Why, for the audit trail.")
@option("--idempotency-key", default=None,
        help="Ask again with the same key and parameters to get the same answer, token included; nothing "
             "changes. Use a random key: who holds it can read the token.")
@json_option
def request(actor: int, course: int, learner: int | None, reason: str, idempotency_key: str | None,
            as_json: bool) -> int:
    """Step 1: validate a reset and get a summary and a confirmation token."""
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        result = resets.request(session, actor, course, learner_id=learner, reason=reason,
                                idempotency_key=idempotency_key, origin="cli")
    human = f"request {result.request_id}: {result.summary['description']}\n"
    if result.replayed:
        human += "  (the answer to the earlier request with this idempotency key; nothing changed)\n"
    if result.token:
        human += (f"  confirm before {result.expires_at.isoformat()} with:\n"
                  f"  progress-reset confirm {result.request_id} --actor {actor} --token {result.token}")
    else:
        human += f"  {result.state}; its token no longer confirms (used or expired)"
    emit(as_json, result.as_json(), human)
    return 0


@click.command("confirm", cls=Command)
@click.argument("request_id", help="The request_id that 'request' printed.")
@option("--actor", type=ID, required=True, help="The admin who made the request.")
@option("--token", required=True, help="The confirmation token that 'request' printed.")
@json_option
def confirm(request_id: str, actor: int, token: str, as_json: bool) -> int:
    """Step 2: confirm a request with its token; the job is queued."""
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        result = resets.confirm(session, request_id, actor, token)
    emit(as_json, result.as_json(), f"job {result.job_id} {result.state}; follow it with: progress-reset status "
                                    f"{result.job_id} --watch")
    return 0


def describe_status(st: dict) -> str:
    notes = st["notifications"]
    lines = [
        f"job {st['job_id']}: {st['state']} ({st['scope']} reset of course {st['course_id']})",
        f"  learners {st['learners_done']}/{st['learners_total']}, batches {st['batches_done']}/"
        f"{st['batches_total']}" + (f" ({st['batches_dead']} dead-lettered)" if st.get("batches_dead") else ""),
        "  cleared: " + (", ".join(f"{k} {v}" for k, v in st["cleared"].items()) or "-"),
        f"  notifications: {notes['sent']} sent, {notes['pending']} pending, {notes['failed']} failed",
        f"  started {st['started_at'] or '-'}, finished {st['finished_at'] or '-'}",
    ]
    if st.get("error"):
        lines.append(f"  error: {st['error']}")
    return "\n".join(lines)


@click.command("status", cls=Command)
@click.argument("job_id", help="The job_id that 'confirm' printed.")
@option("--watch", "live", is_flag=True, help="Draw a live progress bar until the job ends.")
@option("--interval", type=NUMBER, default=0.5, help="Seconds between two reads of the job with --watch.")
@json_option
def status(job_id: str, live: bool, interval: float, as_json: bool) -> int:
    """A job's state and counts."""
    st = watch(job_id, interval) if live else read_status(job_id)
    emit(as_json, st, describe_status(st))
    return 0


@click.command("cancel", cls=Command)
@click.argument("job_id", help="The job to stop.")
@option("--actor", type=ID, required=True, help="An admin of the job's organization.")
@json_option
def cancel(job_id: str, actor: int, as_json: bool) -> int:
    """Stop a queued or running job; learners already reset stay reset."""
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        st = resets.cancel(session, job_id, actor)
    done = resets.plural(st["learners_done"], "learner")
    if st["state"] == JobState.CANCELLING:
        text = (f"job {st['job_id']} cancelling: the batch in flight finishes, then it ends cancelled; "
                f"{done} already reset stay reset")
    else:
        text = f"job {st['job_id']} cancelled; {done} already reset stay reset"
    emit(as_json, st, text)
    return 0


@click.command("demo", cls=Command)
@option("--learners", type=COUNT, default=20_000, help="Learners of the demo organization.")
@option("--concurrency", type=COUNT, default=2, help="Processes of each worker the demo starts.")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (the progress goes to stderr).")
def demo(learners: int, concurrency: int, as_json: bool) -> int:
    """The main job end to end: workers, seed, request, confirm, progress, summary."""
    from producer.demo import run_demo  # starts worker processes: loaded only when the demo runs

    return run_demo(learners=learners, concurrency=concurrency, as_json=as_json)


@click.group("jobs", cls=Group)
def jobs() -> None:
    """Find jobs."""


@jobs.command("list")
@option("--organization", type=ID, required=True, help="The organization whose jobs are listed.")
@option("--course", type=ID, multiple=True, help="Only jobs of this course (repeatable: any of them).")
@option("--learner", type=ID, multiple=True, help="Only one-learner jobs of this learner (repeatable).")
@option("--state", multiple=True, help="Only jobs in this state, e.g. running (repeatable).")
@option("--origin", multiple=True, help="Only jobs started from here: cli, http:<name> or campaign (repeatable).")
@option("--campaign", type=ID, multiple=True, help="Only jobs of this campaign (repeatable).")
@option("--created-after", default=None, help="Only jobs created at or after this ISO-8601 instant.")
@option("--created-before", default=None, help="Only jobs created before this ISO-8601 instant.")
@option("--limit", type=PAGE_LIMIT, default=DEFAULT_LIMIT, help="Jobs per page.")
@option("--cursor", default=None, help="The next_cursor of the previous page.")
@json_option
def jobs_list(organization: int, course: tuple[int, ...], learner: tuple[int, ...], state: tuple[str, ...],
              origin: tuple[str, ...], campaign: tuple[int, ...], created_after: str | None,
              created_before: str | None, limit: int, cursor: str | None, as_json: bool) -> int:
    """An organization's jobs, newest first (the same as GET /v1/resets)."""
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        page = resets.list_jobs(session, organization, course_id=course, learner_id=learner, state=state,
                                origin=origin, campaign_id=campaign, created_after=created_after,
                                created_before=created_before, limit=limit, cursor=cursor)
    lines = [f"{j['job_id']}  {j['state']:<21} {j['scope']:<7} course {j['course_id']}"
             + (f" learner {j['learner_id']}" if j["learner_id"] else "")
             + f"  {j['learners_done']}/{j['learners_total']} learners  {j['created_at']}  {j['origin']}"
             for j in page["items"]] or ["no jobs"]
    if page["next_cursor"]:
        lines.append(f"more: --cursor {page['next_cursor']}")
    emit(as_json, page, "\n".join(lines))
    return 0


COMMANDS = (request, confirm, status, cancel, demo, jobs)
