"""``progress-reset``: the command-line front end of the producer.

Scripts and runbooks depend on how it answers, so the contract is kept in one
place here:

- every refusal is one line on stderr, ``error: ...``, never a usage dump or a
  traceback;
- exit 0 done, 1 refused (the input was read and turned down), 2 the command
  line itself is wrong, 3 the database is unavailable, 130 interrupted;
- ``--json`` prints machine-readable output on stdout.

A wrong value is refused while the command line is read, before anything runs,
always in the form ``argument --OPTION: expected <what>, got '<text>'`` or
``argument --OPTION: <rule>, got <value>``; the parameter types below carry
that wording. The sub-commands live in the ``producer.cli_*`` modules.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from models.errors import ProgressResetError
from models.settings import SettingsError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

# Ids are PostgreSQL ``integer`` columns (the HTTP API has the same bound).
MAX_ID = 2**31 - 1

PROG = "progress-reset"
_PARSE_ONLY = "progress_reset.parse_only"  # Context.meta key: read the command line, run nothing

# The modules whose COMMANDS are the sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = ("producer.cli_resets", "producer.cli_campaigns", "producer.cli_ops", "producer.cli_audit",
                   "producer.cli_webhooks", "producer.cli_retention")


# -- parameter types ------------------------------------------------------------------------------

class _Worded(click.ParamType):
    """click's number ranges, refusing in the project's words.

    Text that is no number: ``expected <noun>, got 'text'``. A number out of
    range (NaN included): ``<rule>, got <number>``; ``rule`` is one text for
    both ends or a ``(below, above)`` pair.
    """

    kind: type

    def __init__(self, noun: str, rule: str | tuple[str, str] = "", metavar: str = "N", **bounds: Any) -> None:
        super().__init__(**bounds)
        self.noun = noun
        self.below, self.above = (rule, rule) if isinstance(rule, str) else rule
        self.metavar = metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def _describe_range(self) -> str:
        """The range ``--help`` shows after an option's text; none without bounds."""
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = self.kind(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"expected {self.noun}, got {value!r}", param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail(f"{self.below}, got {number}", param, ctx)
        try:
            return super().convert(number, param, ctx)
        except click.BadParameter:
            low = self.min is not None and (number <= self.min if self.min_open else number < self.min)
            self.fail(f"{self.below if low else self.above}, got {number}", param, ctx)


class WholeNumber(_Worded, click.IntRange):
    """A whole number within optional bounds (``PORT`` in ``producer.cli_ops`` is one)."""

    kind = int


class DecimalNumber(_Worded, click.FloatRange):
    """A number within optional bounds; NaN is always out of range."""

    kind = float


ID = WholeNumber("a numeric id", ("ids are positive", f"ids are at most {MAX_ID}"), metavar="ID", min=1, max=MAX_ID)
COUNT = WholeNumber("a whole number", ("must be at least 1", f"must be at most {MAX_ID}"), min=1, max=MAX_ID)
WHOLE = WholeNumber("a whole number")
NUMBER = DecimalNumber("a number")
RATIO = DecimalNumber("a number between 0 and 1", "must be between 0 and 1", metavar="RATIO", min=0.0, max=1.0)


class OneOf(click.Choice):
    """A fixed set of words (case-sensitive); refused as ``invalid choice: 'x' (choose from 'a', 'b')``."""

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return f"invalid choice: {value!r} (choose from {', '.join(map(repr, self.choices))})"


class RefusedValue(click.BadParameter):
    """A value refused the way a command refuses its input: exit 1, not 2.

    For a value that has always been checked by the command rather than while
    reading the command line (``campaign run-due --at``), so its exit status stays.
    """

    exit_code = EXIT_REFUSED


# -- options, commands, groups --------------------------------------------------------------------

def _option_names(ctx: click.Context) -> set[str]:
    names: set[str] = set()
    for param in ctx.command.get_params(ctx):
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


class Option(click.Option):
    """An option whose value may begin with "-".

    A token issued before tokens were drawn without a leading "-", or a reason
    like "-fixed typo", is a value: ``--token -abc`` works as ``--token=-abc``.
    A value that is one of the command's own options is not: ``--token --json``
    is a missing value.
    """

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        values = value if isinstance(value, (list, tuple)) else (value,)
        names = _option_names(ctx)
        if any(isinstance(text, str) and text.split("=", 1)[0] in names for text in values):
            raise click.BadOptionUsage(self.opts[0], "expected one argument", ctx)
        return super().process_value(ctx, value)


def option(*decls: str, **attrs: Any):
    """``click.option`` with the :class:`Option` class; every option says what it is for (``help``)."""
    return click.option(*decls, cls=Option, **attrs)


json_option = option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


class Command(click.Command):
    """A command that runs something: logging is configured once its command line has been read.

    ``one_of`` names options of which exactly one must be given. Words left over
    are refused as ``unrecognized arguments``.
    """

    def __init__(self, *args: Any, one_of: Sequence[str] = (), **kwargs: Any) -> None:
        kwargs["context_settings"] = {"allow_extra_args": True, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)
        self.one_of = tuple(one_of)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            rest = super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.ctx = exc.ctx or ctx  # click's parser leaves it out of some errors; the message names the command
            raise
        if ctx.resilient_parsing:
            return rest
        if rest:
            raise click.UsageError(f"unrecognized arguments: {' '.join(rest)}", ctx)
        if self.one_of:
            given = [opt for opt in self.one_of if ctx.get_parameter_source(self._param_of(opt).name)
                     is click.core.ParameterSource.COMMANDLINE]
            if not given:
                raise click.UsageError(f"one of the arguments {' '.join(self.one_of)} is required", ctx)
            if len(given) > 1:
                raise click.UsageError(f"argument {given[1]}: not allowed with argument {given[0]}", ctx)
        return rest

    def _param_of(self, opt: str) -> click.Parameter:
        return next(p for p in self.params if isinstance(p, click.Option) and opt in p.opts)

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.meta.get(_PARSE_ONLY):
            return ctx
        from models.logs import configure_logging

        configure_logging()
        return super().invoke(ctx)


class Group(click.Group):
    """A command with sub-commands; without one it is a usage error (not the help), like any missing argument."""

    command_class = Command
    group_class = type  # sub-groups are Groups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            raise click.UsageError("the following arguments are required: command", ctx)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they were added: step 1 before step 2


class _Root(Group):
    """``progress-reset``: its sub-commands are added on first use.

    They import the types above from this module, so they cannot be imported
    while it loads. ``main`` is the one place refusals become an exit status,
    for the console script and ``click.testing.CliRunner`` alike.
    """

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            for name in COMMAND_MODULES:
                for command in importlib.import_module(name).COMMANDS:
                    self.add_command(command)
            self._loaded = True

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

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
        with command.make_context(prog_name, argv) as ctx:
            return command.invoke(ctx) or 0
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
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


def parse(argv: Sequence[str]) -> click.Context:
    """The context of the command ``argv`` names, every value read and checked; nothing runs.

    Raises ``click.UsageError`` as a run would (docker-compose's commands are checked this way).
    """
    with cli.make_context(PROG, list(argv)) as ctx:
        ctx.meta[_PARSE_ONLY] = True
        return cli.invoke(ctx)


def emit(as_json: bool, payload: dict, human: str) -> None:
    """Print ``payload`` as JSON with ``--json``, else the human-readable text."""
    if as_json:
        print(json.dumps(payload, default=str, sort_keys=True))
    else:
        print(human)


# -- db, seed -------------------------------------------------------------------------------------

@cli.group("db")
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@json_option
def db_upgrade(as_json: bool) -> int:
    """Apply the migrations (safe to run again)."""
    from models.migrate import current_revision, upgrade

    upgrade()
    revision = current_revision()
    emit(as_json, {"revision": revision}, f"database at revision {revision}")
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


if __name__ == "__main__":  # pragma: no cover
    # ``python -m producer.cli``: run the package module's group, the one the command modules add to.
    from producer.cli import main as package_main

    sys.exit(package_main())
