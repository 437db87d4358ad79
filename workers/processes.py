"""Start and stop real Celery processes (worker, beat, flower): the demo, the benchmark and the
tests all use this one launcher. Production runs Celery's own CLI; this only wraps that command.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from models.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_SECONDS = 15.0
READY_PATTERN = r"\bready\.\s*$"


def _children_of(pid: int) -> list[int]:
    pids: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids.extend(int(p) for p in children.read_text().split())
        except OSError:
            continue
    return sorted(set(pids))


class CeleryProcess:
    """A real ``celery -A workers ...`` subprocess (worker, beat, flower) started by a test.

    It runs in a process group of its own, so stopping it reaches its pool
    children, even orphaned ones, and nothing else.
    """

    def __init__(self, popen: subprocess.Popen, log_path: Path, name: str):
        self.popen = popen
        self.log_path = log_path
        self.name = name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        """The pool process ids (direct children of the main process)."""
        return _children_of(self.pid) if self.alive() else []

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker logs that it is ready to consume."""
        self.wait_for_log(READY_PATTERN, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait until the log matches the regular expression ``pattern``; fails on timeout or exit."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before "
                                     f"{pattern!r} appeared; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {pattern!r} not in its log after {timeout:.0f}s; "
                                     f"log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # the group start_celery created (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        """Warm shutdown (SIGTERM to the main process): running tasks finish first."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def kill(self, whole_group: bool = True) -> None:
        """``kill -9``: the main process and, by default, its pool children too."""
        if whole_group:
            self._signal_group(signal.SIGKILL)
        elif self.alive():
            self.popen.kill()
        self.wait(10)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM, then SIGKILL for the whole group after ``timeout`` seconds."""
        self.terminate()
        if self.wait(timeout) is None:
            self._signal_group(signal.SIGKILL)
            self.wait(10)
        # Pool children orphaned by a killed main process share its group.
        self._signal_group(signal.SIGKILL)


def start_celery(
    args: list[str],
    *,
    env: dict[str, str] | None,
    log_path: Path,
    name: str,
    cwd: Path,
    ready_pattern: str | None = None,
    ready_timeout: float = 30.0,
    niceness: int = 0,
) -> CeleryProcess:
    """Start ``python -m celery -A workers <args>`` with ``env`` over ``os.environ``, logging to ``log_path``.

    With ``ready_pattern``, waits until the log matches it (and stops the
    process if it does not). The caller stops the returned process.
    """
    argv = [sys.executable, "-m", "celery", "-A", "workers", *args]
    if niceness:
        # Lower CPU priority: work that is not latency-critical (notifications) yields the cores
        # to resets on a shared host.
        argv = ["nice", "-n", str(niceness), *argv]
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    full_env.setdefault("PYTHONPATH", str(REPO_ROOT))
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    process = CeleryProcess(popen, log_path, name)
    if ready_pattern is not None:
        try:
            process.wait_for_log(ready_pattern, timeout=ready_timeout)
        except AssertionError:
            process.stop(timeout=5)
            raise
    return process


def start_worker(
    queues: str,
    concurrency: int = 2,
    name: str = "worker",
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    beat: bool = False,
    extra_args: list[str] | None = None,
    niceness: int = 0,
) -> CeleryProcess:
    """Start ``celery -A workers worker -Q queues`` as a subprocess; returns once it is spawned
    (``wait_ready()`` waits for it to consume)."""
    log_dir = log_dir or get_settings().data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    args = ["worker", "-Q", queues, "-c", str(concurrency), "-P", "prefork", "-n", f"{name}@%h",
            "--without-mingle", "--without-gossip", "-l", "info"]
    if beat:
        args += ["-B", "-s", str(log_dir / f"{name}-beat-schedule")]
    # The worker runs in the repository root: give it this process's data folder (SQLite file and
    # filesystem broker of the embedded default), not its own.
    full_env = {"PROGRESS_RESET_DATA_DIR": str(get_settings().data_dir), **(env or {})}
    log_path = log_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    return start_celery([*args, *(extra_args or [])], env=full_env, log_path=log_path, name=name, cwd=REPO_ROOT,
                        niceness=niceness)
