"""Start and stop real Celery worker processes (used by the demo and the benchmark).

Production runs workers with Celery's own CLI; this only wraps that command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from models.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        """Pids of the pool processes (from /proc)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                found.extend(int(p) for p in (task / "children").read_text().split())
            except (FileNotFoundError, ValueError):
                continue
        return found

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}: "
                                   f"{self.log_text()[-2000:]}")
            if " ready." in self.log_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout:.0f}s: {self.log_text()[-2000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the process group after ``timeout``."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the main process and its pool children."""
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_worker(
    queues: str,
    concurrency: int = 2,
    name: str = "worker",
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    beat: bool = False,
    extra_args: list[str] | None = None,
    niceness: int = 0,
) -> WorkerProcess:
    """Start ``celery -A workers worker -Q queues`` as a subprocess; returns once it is spawned."""
    log_dir = log_dir or get_settings().data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", queues, "-c", str(concurrency),
           "-P", "prefork", "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-l", "info"]
    if beat:
        cmd += ["-B", "-s", str(log_dir / f"{name}-beat-schedule")]
    cmd += extra_args or []
    if niceness:
        # Lower CPU priority: work that is not latency-critical (notifications)
        # yields the cores to resets on a shared host.
        cmd = ["nice", "-n", str(niceness), *cmd]
    full_env = dict(os.environ)
    # The worker runs in the repository root: give it this process's data folder
    # (SQLite file and filesystem broker of the embedded default), not its own.
    full_env["PROGRESS_RESET_DATA_DIR"] = str(get_settings().data_dir)
    full_env.update(env or {})
    full_env.setdefault("PYTHONPATH", str(REPO_ROOT))
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return WorkerProcess(name, process, log_path)
