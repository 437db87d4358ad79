"""CLI commands of the reset flow: request, confirm, status (with ``--watch``), cancel."""

from __future__ import annotations

import argparse
import time

from producer.cli import command, emit, id_arg


def add_commands(sub) -> None:
    r = sub.add_parser("request", help="step 1: validate a reset and get a summary and a confirmation token")
    r.add_argument("--actor", type=id_arg, required=True)
    r.add_argument("--course", type=id_arg, required=True)
    r.add_argument("--learner", type=id_arg, default=None, help="reset one learner (default: every learner)")
    r.add_argument("--reason", default="")
    r.add_argument("--idempotency-key", default=None)
    r.add_argument("--json", action="store_true")

    c = sub.add_parser("confirm", help="step 2: confirm a request with its token; the job is queued")
    c.add_argument("request_id")
    c.add_argument("--actor", type=id_arg, required=True)
    c.add_argument("--token", required=True)
    c.add_argument("--json", action="store_true")

    s = sub.add_parser("status", help="a job's state and counts")
    s.add_argument("job_id")
    s.add_argument("--watch", action="store_true", help="draw a live progress bar until the job ends")
    s.add_argument("--interval", type=float, default=0.5)
    s.add_argument("--json", action="store_true")

    x = sub.add_parser("cancel", help="stop a queued or running job")
    x.add_argument("job_id")
    x.add_argument("--actor", type=id_arg, required=True)
    x.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="the main job end to end: workers, seed, request, confirm, progress, summary")
    d.add_argument("--learners", type=id_arg, default=20_000)
    d.add_argument("--concurrency", type=id_arg, default=2)
    d.add_argument("--json", action="store_true")


@command("request")
def cmd_request(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        result = resets.request(session, args.actor, args.course, learner_id=args.learner, reason=args.reason,
                                idempotency_key=args.idempotency_key, origin="cli")
    human = f"request {result.request_id}: {result.summary['description']}\n"
    if result.token:
        human += (f"  confirm before {result.expires_at.isoformat()} with:\n"
                  f"  progress-reset confirm {result.request_id} --actor {args.actor} --token {result.token}")
    else:
        human += f"  already {result.state}; no new token"
    emit(args, result.as_json(), human)
    return 0


@command("confirm")
def cmd_confirm(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        result = resets.confirm(session, args.request_id, args.actor, args.token)
    emit(args, result.as_json(), f"job {result.job_id} {result.state}; follow it with: progress-reset status "
                                 f"{result.job_id} --watch")
    return 0


def read_status(job_id: str) -> dict:
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        return resets.status(session, job_id)


TERMINAL_STATES = {"succeeded", "failed", "cancelled", "expired"}


def watch(job_id: str, interval: float = 0.5, console=None) -> dict:
    """Draw a live progress bar (learners done/total, rate, ETA) until the job ends; return the last status."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or Console(stderr=True)
    current = read_status(job_id)
    with Progress(
        TextColumn("[bold]{task.fields[state]:>9}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("learners"), TextColumn("{task.fields[rate]:>8} /s"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[phase]}"), console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("reset", total=max(current["learners_total"], 1), state=current["state"], rate="-",
                                phase="")
        started = time.monotonic()
        first_done = current["learners_done"]
        while True:
            elapsed = time.monotonic() - started
            rate = (current["learners_done"] - first_done) / elapsed if elapsed > 0 else 0.0
            progress.update(bar, total=max(current["learners_total"], current["learners_done"], 1),
                            completed=current["learners_done"], state=current["state"], rate=f"{rate:,.0f}",
                            phase=_phase(current))
            if current["state"] in TERMINAL_STATES:
                break
            time.sleep(interval)
            current = read_status(job_id)
    return current


def _phase(st: dict) -> str:
    """What the job is doing besides counting learners: the purge of older rows, once it runs."""
    total = st.get("purge_batches_total") or 0
    if st["state"] != "running" or not total:
        return ""
    done = st.get("purge_batches_done") or 0
    if st["batches_done"] - done < st.get("learner_batches_total", 0):
        return "resetting learners"
    return f"clearing older rows: {done}/{total} parts"


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


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    st = watch(args.job_id, args.interval) if args.watch else read_status(args.job_id)
    emit(args, st, describe_status(st))
    return 0


@command("cancel")
def cmd_cancel(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        st = resets.cancel(session, args.job_id, args.actor)
    done = resets.plural(st["learners_done"], "learner")
    if st["state"] == "cancelling":
        text = (f"job {st['job_id']} cancelling: the batch in flight finishes, then it ends cancelled; "
                f"{done} already reset stay reset")
    else:
        text = f"job {st['job_id']} cancelled; {done} already reset stay reset"
    emit(args, st, text)
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(learners=args.learners, concurrency=args.concurrency, as_json=args.json)


def add_listing_commands(sub) -> None:
    from producer.pages import DEFAULT_LIMIT

    jobs = sub.add_parser("jobs", help="find jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, parser_class=type(jobs))
    ls = jsub.add_parser("list", help="an organization's jobs, newest first (the same as GET /v1/resets)")
    ls.add_argument("--organization", type=id_arg, required=True)
    ls.add_argument("--course", type=id_arg, default=None)
    ls.add_argument("--learner", type=id_arg, default=None)
    ls.add_argument("--state", default=None)
    ls.add_argument("--origin", default=None)
    ls.add_argument("--campaign", type=id_arg, default=None)
    ls.add_argument("--created-after", default=None, help="ISO-8601, inclusive")
    ls.add_argument("--created-before", default=None, help="ISO-8601, exclusive")
    ls.add_argument("--limit", type=id_arg, default=DEFAULT_LIMIT, help=f"jobs per page, 1-200 (default {DEFAULT_LIMIT})")
    ls.add_argument("--cursor", default=None, help="next_cursor of the previous page")
    ls.add_argument("--json", action="store_true")


@command("jobs")
def cmd_jobs(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from producer import resets

    with session_scope() as session:
        page = resets.list_jobs(session, args.organization, course_id=args.course, learner_id=args.learner,
                                state=args.state, origin=args.origin, campaign_id=args.campaign,
                                created_after=args.created_after, created_before=args.created_before,
                                limit=args.limit, cursor=args.cursor)
    lines = [f"{j['job_id']}  {j['state']:<21} {j['scope']:<7} course {j['course_id']}"
             + (f" learner {j['learner_id']}" if j["learner_id"] else "")
             + f"  {j['learners_done']}/{j['learners_total']} learners  {j['created_at']}  {j['origin']}"
             for j in page["items"]] or ["no jobs"]
    if page["next_cursor"]:
        lines.append(f"more: --cursor {page['next_cursor']}")
    emit(args, page, "\n".join(lines))
    return 0
