"""Where the CLI's output goes (a file, or standard output) and what a failed write becomes.

Scripts pipe the CLI into other tools and write exports to files, so two
failures are part of its interface rather than tracebacks:

- a file or standard output that cannot be written (no such folder, a
  directory, a full disk) is one ``error: cannot write ...`` line and exit 1
  (:class:`OutputError`, printed by :func:`producer.cli.run`), and a file the
  command created is removed rather than left half-written;
- a reader that goes away (``progress-reset audit export ... | head -1``) ends
  the command quietly with :data:`EXIT_CLOSED_PIPE`, the status a shell reports
  for any Unix tool ended by SIGPIPE. Python ignores that signal and raises
  ``BrokenPipeError`` instead; :func:`producer.cli.run` turns it into this exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import click

EXIT_CLOSED_PIPE = 128 + 13  # 128 + SIGPIPE


class OutputError(click.ClickException):
    """The output cannot be written: one ``error:`` line, exit 1 (as a refusal)."""

    exit_code = 1

    def __init__(self, where: str, exc: OSError) -> None:
        super().__init__(f"cannot write {where}: {exc.strerror or exc}")


@contextmanager
def _writing_stdout() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise  # the reader went away: not an error (see the module docstring)
    except OSError as exc:
        raise OutputError("standard output", exc) from None


def write_output(output: str | None, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to the file ``output`` (created or replaced), or to standard output without one."""
    if not output:
        with _writing_stdout():
            for chunk in chunks:
                sys.stdout.write(chunk)
        return
    created = not os.path.lexists(output)
    try:
        with open(output, "w", encoding="utf-8", newline="") as out:
            for chunk in chunks:
                out.write(chunk)
    except BaseException as exc:
        if created and os.path.isfile(output):
            os.unlink(output)  # only a regular file this call made: never /dev/full, never one that was there
        if isinstance(exc, OSError):
            raise OutputError(output, exc) from None
        raise


def flush_stdout() -> None:
    """Flush what is still buffered: a short output meets its closed pipe or full disk only here."""
    with _writing_stdout():
        sys.stdout.flush()


def discard_stdout() -> None:
    """Point standard output at the null device once its reader is gone, so that the interpreter's
    last flush does not report the closed pipe a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (click's test runner): nothing flushes to a pipe
        pass
