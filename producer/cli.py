"""``progress-reset``: the command-line front end of the producer.

Every refusal prints one line on stderr (``error: ...``) and exits non-zero;
``--json`` prints machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from models.errors import ProgressResetError
from models.settings import SettingsError

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3

# Ids are PostgreSQL ``integer`` columns (the HTTP API has the same bound).
MAX_ID = 2**31 - 1

# Options whose value is free text that may begin with "-" (a token issued before tokens
# were drawn without a leading "-", a reason like "-fixed typo"). argparse reads such a
# value as an option; ``--token=-abc`` always worked, and ``--token -abc`` now does too.
FREE_TEXT_OPTIONS = ("--token", "--reason", "--idempotency-key", "--name")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def emit(args: argparse.Namespace, payload: dict, human: str) -> None:
    """Print ``payload`` as JSON with ``--json``, else the human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str, sort_keys=True))
    else:
        print(human)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def id_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a numeric id, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"ids are positive, got {value}")
    if value > MAX_ID:
        raise argparse.ArgumentTypeError(f"ids are at most {MAX_ID}, got {value}")
    return value


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="progress-reset", description="Reset learners' course progress, confirmed and audited.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    up = db_sub.add_parser("upgrade", help="apply the migrations")
    up.add_argument("--json", action="store_true")

    s = sub.add_parser("seed", help="create a realistic organization with courses and learners")
    s.add_argument("--learners", type=positive_int, required=True)
    s.add_argument("--lessons", type=positive_int, default=20)
    s.add_argument("--courses", type=positive_int, default=1)
    s.add_argument("--completed-ratio", type=ratio, default=0.3)
    s.add_argument("--random-seed", type=int, default=None)
    s.add_argument("--json", action="store_true")

    from producer import cli_resets

    cli_resets.add_commands(sub)
    cli_resets.add_listing_commands(sub)
    for module_name in ("producer.cli_campaigns", "producer.cli_ops", "producer.cli_audit",
                        "producer.cli_webhooks"):
        try:
            module = __import__(module_name, fromlist=["add_commands"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_commands(sub)
    return parser


@command("db")
def cmd_db(args: argparse.Namespace) -> int:
    from models.migrate import current_revision, upgrade

    upgrade()
    revision = current_revision()
    emit(args, {"revision": revision}, f"database at revision {revision}")
    return 0


@command("seed")
def cmd_seed(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from models.seed import seed

    started = time.perf_counter()
    with session_scope() as session:
        result = seed(session, learners=args.learners, lessons=args.lessons, courses=args.courses,
                      completed_ratio=args.completed_ratio, random_seed=args.random_seed)
    elapsed = time.perf_counter() - started
    payload = result.as_json() | {"seconds": round(elapsed, 2)}
    emit(args, payload,
         f"organization {result.organization_id}: admin {result.admin_id}, learner {result.learner_id}, "
         f"courses {', '.join(map(str, result.course_ids))} ({result.learners} learners, {elapsed:.1f}s)")
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its sub-commands."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def join_free_text_values(argv: list[str], options: set[str]) -> list[str]:
    """``--token -abc`` -> ``--token=-abc`` for the free-text options, unless ``-abc`` is itself an option."""
    joined: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (arg in FREE_TEXT_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and argv[i + 1].split("=", 1)[0] not in options):
            joined.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        joined.append(arg)
        i += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(join_free_text_values(argv, _option_strings(parser)))
    from models.logs import configure_logging

    try:
        configure_logging()
        return COMMANDS[args.command](args)
    except ProgressResetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except SettingsError as exc:
        print(f"error: configuration: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except OperationalError as exc:
        reason = _one_line(exc.orig if exc.orig is not None else exc)
        print(f"error: database unavailable: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SQLAlchemyError as exc:
        print(f"error: database: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # Run through the package module so commands register in one COMMANDS table.
    from producer.cli import main as package_main

    sys.exit(package_main())
