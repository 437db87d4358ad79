"""``progress-reset``: the command-line front end of the producer.

The root command, the commands of the schema and the seed, and :func:`run`, the one place a
refusal becomes an exit status (see :mod:`producer.cli_parameters` for the contract). The other
sub-commands live in the ``producer.cli_*`` modules, one per subject.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from models.errors import ProgressResetError
from models.settings import SettingsError
from producer import cli_audit, cli_campaigns, cli_ops, cli_resets, cli_retention, cli_webhooks
from producer.output import EXIT_CLOSED_PIPE, discard_stdout, flush_stdout
from producer.cli_parameters import (
    COUNT,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    PARSE_ONLY,
    PROG,
    RATIO,
    WHOLE,
    Group,
    emit,
    json_option,
    option,
)

# The subjects' commands, in the order ``--help`` lists them.
COMMAND_MODULES = (cli_resets, cli_campaigns, cli_ops, cli_audit, cli_webhooks, cli_retention)


class _Root(Group):
    """``progress-reset``. ``main`` is the one place refusals become an exit status, for the
    console script and ``click.testing.CliRunner`` alike."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        code = run(self, sys.argv[1:] if args is None else list(args), prog_name or PROG)
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(PROG, cls=_Root, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                                  "max_content_width": 100})
def cli() -> None:
    """Reset learners' course progress, confirmed and audited."""


# -- refusals -------------------------------------------------------------------------------------

def _name(param: click.Parameter) -> str:
    return max(param.opts, key=len) if isinstance(param, click.Option) else param.name or "?"


def usage_error_line(exc: click.UsageError) -> str:
    """One line for a command line click refused, in argparse's words (what scripts and docs quote)."""
    ctx = exc.ctx
    if isinstance(exc, click.MissingParameter) and exc.param is not None:
        message = f"the following arguments are required: {_name(exc.param)}"
    elif isinstance(exc, click.BadParameter) and exc.param is not None:
        message = f"argument {_name(exc.param)}: {exc.message}"
    elif isinstance(exc, click.BadOptionUsage):
        param = next((p for p in ctx.command.get_params(ctx) if isinstance(p, click.Option)
                      and exc.option_name in p.opts), None) if ctx else None
        flag = param is not None and param.is_flag
        message = f"argument {exc.option_name}: {'takes no value' if flag else 'expected one argument'}"
    elif isinstance(exc, click.NoSuchOption):
        message = f"unrecognized arguments: {exc.option_name}"
        if exc.possibilities:
            message += f" (did you mean {' or '.join(exc.possibilities)}?)"
    elif isinstance(exc, click.exceptions.NoSuchCommand) and ctx is not None:
        choices = ", ".join(repr(name) for name in ctx.command.list_commands(ctx))
        message = f"argument command: invalid choice: {exc.command_name!r} (choose from {choices})"
    else:
        message = exc.format_message()
    return f"{message} (see '{ctx.command_path if ctx else PROG} --help')"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run(command: click.Command, argv: list[str], prog_name: str = PROG) -> int:
    """Read ``argv``, run the command it names and return the exit status; refusals are one ``error:`` line."""
    try:
        try:
            with command.make_context(prog_name, argv) as ctx:
                return command.invoke(ctx) or 0
        except click.exceptions.Exit as exc:  # --help
            return exc.exit_code
        finally:
            flush_stdout()  # short output is still buffered: its closed pipe or full disk shows here
    except BrokenPipeError:
        discard_stdout()
        return EXIT_CLOSED_PIPE
    except click.UsageError as exc:
        print(f"error: {usage_error_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except click.ClickException as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
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
    except (KeyboardInterrupt, click.Abort):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # e.g. --help written to a full disk: still one line, never a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return EXIT_REFUSED


def parse(argv: Sequence[str]) -> click.Context:
    """The context of the command ``argv`` names, every value read and checked; nothing runs.

    Raises ``click.UsageError`` as a run would (docker-compose's commands are checked this way).
    """
    with cli.make_context(PROG, list(argv)) as ctx:
        ctx.meta[PARSE_ONLY] = True
        return cli.invoke(ctx)


# -- db, seed -------------------------------------------------------------------------------------

@cli.group("db")
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@json_option
def db_upgrade(as_json: bool) -> int:
    """Apply the migrations, then the application role's grants (DATABASE_APP_ROLE); safe to run again."""
    from models.migrate import current_revision, upgrade
    from models.privileges import grant_app_role

    upgrade()
    grants = grant_app_role()
    revision = current_revision()
    role = None if grants is None else grants.role
    human = f"database at revision {revision}"
    if grants is not None:
        human += f"; application role {role} {'created and ' if grants.created else ''}granted its privileges"
    emit(as_json, {"revision": revision, "app_role": role, "app_role_created": bool(grants and grants.created)}, human)
    return 0


@cli.command("seed")
@option("--learners", type=COUNT, required=True, help="Learners in the new organization.")
@option("--lessons", type=COUNT, default=20, help="Lessons per course.")
@option("--courses", type=COUNT, default=1, help="Courses, each assigned to every learner.")
@option("--completed-ratio", type=RATIO, default=0.3, help="Share of learners who completed a course.")
@option("--random-seed", type=WHOLE, default=None, help="Seed for the random data, for a repeatable organization.")
@json_option
def seed(learners: int, lessons: int, courses: int, completed_ratio: float, random_seed: int | None,
         as_json: bool) -> int:
    """Create a realistic organization with courses and learners."""
    from models.db import session_scope
    from models.seed import seed as seed_organization

    started = time.perf_counter()
    with session_scope() as session:
        result = seed_organization(session, learners=learners, lessons=lessons, courses=courses,
                                   completed_ratio=completed_ratio, random_seed=random_seed)
    elapsed = time.perf_counter() - started
    payload = result.as_json() | {"seconds": round(elapsed, 2)}
    emit(as_json, payload,
         f"organization {result.organization_id}: admin {result.admin_id}, learner {result.learner_id}, "
         f"courses {', '.join(map(str, result.course_ids))} ({result.learners} learners, {elapsed:.1f}s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run ``argv`` (default: the process's arguments) and return the exit status."""
    return cli.main(argv, standalone_mode=False)


for _module in COMMAND_MODULES:
    for _command in _module.COMMANDS:
        cli.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
