"""CLI commands for operations: ``serve``, ``api-key create|list|revoke``, ``health``, ``dead-batches``, ``openapi``.

What an operator runs next to the workers: the HTTP producer, its API keys,
the check that every queue is consumed, the report of dead-lettered batches,
and the committed OpenAPI document.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from producer.cli_parameters import (
    COUNT,
    EXIT_USAGE,
    ID,
    Command,
    DecimalNumber,
    Group,
    WholeNumber,
    emit,
    json_option,
    option,
)
from producer.output import write_output

REPO_ROOT = Path(__file__).resolve().parent.parent
OPENAPI_PATH = REPO_ROOT / "docs" / "openapi.json"

PORT = WholeNumber("a port number", "a port is 1 to 65535", metavar="PORT", min=1, max=65535)
TIMEOUT = DecimalNumber("a number of seconds", "must be more than 0 and at most 600 seconds", metavar="SECONDS",
                        min=0.0, min_open=True, max=600.0)


@click.command("serve", cls=Command)
@option("--host", default=None, show_default="HTTP_HOST, 127.0.0.1", help="Address to bind.")
@option("--port", type=PORT, default=None, show_default="HTTP_PORT, 8080", help="Port to listen on.")
@option("--workers", type=COUNT, default=1, help="uvicorn worker processes.")
def serve(host: str | None, port: int | None, workers: int) -> int:
    """Run the HTTP producer (FastAPI on uvicorn)."""
    import uvicorn

    from models.logs import log_event, logger
    from models.settings import get_settings

    settings = get_settings()
    host = host or settings.http_host
    port = port or settings.http_port
    # uvicorn's own messages (startup, errors) go through the project's formatter;
    # its access log is replaced by the one http.request line per request.
    for name in ("uvicorn", "uvicorn.error"):
        uv = logging.getLogger(name)
        uv.handlers[:] = list(logger.handlers)
        uv.setLevel(logging.INFO)
        uv.propagate = False
    log_event("http.serve.starting", host=host, port=port, workers=workers)
    uvicorn.run("producer.http:create_app", factory=True, host=host, port=port, workers=workers,
                log_config=None, access_log=False, server_header=False, proxy_headers=False)
    return 0


@click.group("api-key", cls=Group)
def api_key() -> None:
    """API keys of the services that call the HTTP producer."""


@api_key.command("create")
@option("--organization", type=ID, required=True, help="The one organization the key acts for.")
@option("--name", required=True, help="The calling service (recorded as origin http:<name>).")
@json_option
def api_key_create(organization: int, name: str, as_json: bool) -> int:
    """Create a key for one organization; the key is shown once."""
    from models.db import session_scope
    from producer import apikeys

    with session_scope() as session:
        created = apikeys.create_api_key(session, organization, name)
    emit(as_json, created.as_json(),
         f"API key {created.prefix} for organization {created.organization_id} ({created.name}):\n"
         f"  {created.key}\n"
         "  shown once: store it in the calling service's secrets now")
    return 0


@api_key.command("list")
@option("--organization", type=ID, default=None, help="Only this organization's keys (default: every key).")
@json_option
def api_key_list(organization: int | None, as_json: bool) -> int:
    """Keys (prefix, name, organization, revoked), never the secrets."""
    from models.db import session_scope
    from producer import apikeys

    with session_scope() as session:
        keys = apikeys.list_api_keys(session, organization)
    lines = [f"{k['prefix']}  org {k['organization_id']}  {k['name']}  created {k['created_at']}"
             + (f"  REVOKED {k['revoked_at']}" if k["revoked_at"] else "") for k in keys]
    emit(as_json, {"keys": keys}, "\n".join(lines) or "no API keys")
    return 0


@api_key.command("revoke")
@click.argument("prefix", help="The key's prefix, as 'api-key list' shows it (prk_...).")
@json_option
def api_key_revoke(prefix: str, as_json: bool) -> int:
    """Revoke a key by its prefix; refused from the next request on."""
    from models.db import session_scope
    from producer import apikeys

    with session_scope() as session:
        revoked = apikeys.revoke_api_key(session, prefix)
    emit(as_json, revoked, f"API key {revoked['prefix']} ({revoked['name']}) revoked at {revoked['revoked_at']}")
    return 0


def describe_health(report) -> str:
    mark = {True: "ok  ", False: "FAIL"}
    lines = [f"{'database':<14} {mark[report.database.ok]} {report.database.detail}",
             f"{'broker':<14} {mark[report.broker.ok]} {report.broker.detail}"]
    for q in report.queues:
        flag = "warn" if q.ok and q.state != "ok" else mark[q.ok]
        lines.append(f"{q.queue:<14} {flag} {q.detail}")
    lines.append("healthy" if report.ok else "UNHEALTHY")
    return "\n".join(lines)


@click.command("health", cls=Command)
@option("--timeout", type=TIMEOUT, default=10.0, help="Seconds to wait for each queue's canary.")
@option("--queue", "queues", multiple=True, show_default="every queue",
        help="Check only this queue (repeatable).")
@json_option
def health(timeout: float, queues: tuple[str, ...], as_json: bool) -> int:
    """Check the database, the broker and that every queue is consumed."""
    from models.queues import QUEUES
    from workers.health import run_health_check

    queues = queues or QUEUES
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        print(f"error: unknown queue {', '.join(unknown)}; the queues are {', '.join(QUEUES)}",
              file=sys.stderr)
        return EXIT_USAGE
    report = run_health_check(timeout=timeout, queues=queues)
    emit(as_json, report.as_json(), describe_health(report))
    if not report.ok:
        print(f"error: unhealthy: {'; '.join(report.problems())}", file=sys.stderr)
        return 1
    return 0


@click.command("dead-batches", cls=Command)
@option("--job", default=None, help="Only this job's batches.")
@option("--limit", type=COUNT, default=50, help="At most this many batches, newest first.")
@json_option
def dead_batches_command(job: str | None, limit: int, as_json: bool) -> int:
    """Dead-lettered batches: why, and what is left to do for each."""
    from models.batches import dead_batch_report
    from models.db import session_scope

    with session_scope() as session:
        found = dead_batch_report(session, job, limit)
    lines = []
    for item in found:
        head = (f"job {item['job_id']} ({item['job_state']}, course {item['course_id']}) batch {item['batch_no']} "
                f"[{item['kind']}] after {item['attempts']} attempts: {item['error']}")
        if item["kind"] == "purge":
            lines += [head, f"  pre-job {item['component']} rows left: id {item['after_row_id']}..{item['up_to_row_id']}",
                      f"  finish by hand once the cause is fixed: {item['manual_sql']}"]
        else:
            ids = item["learners_not_reset"]
            shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
            lines += [head, f"  {len(ids)} learners not reset: {shown or '-'}",
                      "  re-run them as one-learner resets (docs/operations.md, 'Dead-lettered batches')"]
    emit(as_json, {"batches": found}, "\n".join(lines) or "no dead-lettered batches")
    return 0


@click.command("openapi", cls=Command)
@option("--output", default=None, help="Write it to this file instead of stdout.")
@option("--check", is_flag=True, help=f"Exit 1 if {OPENAPI_PATH.relative_to(REPO_ROOT)} differs.")
def openapi(output: str | None, check: bool) -> int:
    """Print the HTTP API's OpenAPI schema (or --check it against docs/)."""
    from producer.http import openapi_document

    text = json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
    if check:
        committed = OPENAPI_PATH.read_text() if OPENAPI_PATH.exists() else ""
        if committed != text:
            print(f"error: {OPENAPI_PATH} is out of date; regenerate it with "
                  f"'progress-reset openapi --output {OPENAPI_PATH.relative_to(REPO_ROOT)}'", file=sys.stderr)
            return 1
        print(f"{OPENAPI_PATH.relative_to(REPO_ROOT)} is up to date")
        return 0
    write_output(output, [text])
    return 0


COMMANDS = (serve, api_key, health, dead_batches_command, openapi)
