"""The building blocks of ``progress-reset``'s commands: parameter types, options, command classes,
exit statuses and output.

Scripts and runbooks depend on how the CLI answers, so the contract is kept here once:

- every refusal is one line on stderr, ``error: ...``, never a usage dump or a traceback;
- exit 0 done, 1 refused (the input was read and turned down, or the output
  file cannot be written), 2 the command line itself is wrong, 3 the database is
  unavailable, 130 interrupted, 141 the reader of standard output went away (a
  closed pipe, as in ``| head -1``: nothing printed, the status a shell reports
  for any Unix tool ended by SIGPIPE; :mod:`producer.output`);
- ``--json`` prints machine-readable output on stdout.

A wrong value is refused while the command line is read, before anything runs,
always in the form ``argument --OPTION: expected <what>, got '<text>'`` or
``argument --OPTION: <rule>, got <value>``; the parameter types below carry
that wording. The commands live in :mod:`producer.cli` and the ``producer.cli_*`` modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import click

from producer.output import write_output
from producer.pages import MAX_LIMIT

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

# Ids are PostgreSQL ``integer`` columns (the HTTP API has the same bound).
MAX_ID = 2**31 - 1

PROG = "progress-reset"
PARSE_ONLY = "progress_reset.parse_only"  # Context.meta key: read the command line, run nothing


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
# Rows per page of a listing: the bound the listing functions check, so --help shows the real range.
PAGE_LIMIT = WholeNumber("a whole number", ("must be at least 1", f"must be at most {MAX_LIMIT}"),
                         min=1, max=MAX_LIMIT)
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
        if ctx.meta.get(PARSE_ONLY):
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


def emit(as_json: bool, payload: dict, human: str) -> None:
    """Print ``payload`` as JSON with ``--json``, else the human-readable text."""
    write_output(None, [(json.dumps(payload, default=str, sort_keys=True) if as_json else human) + "\n"])
