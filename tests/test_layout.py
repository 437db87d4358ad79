"""The layout's rules, checked: the dependency direction (import-linter, as `make lint` runs it)
and modules small enough to read whole."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("models", "tasks", "workers", "producer")
# A module this long does one job only (a reader still finds everything in it by its name).
MAX_LINES = 450
ONE_JOB_EXCEPTIONS = {
    "models/schema.py": "the table definitions, one class per table",
}


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


def test_the_dependency_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_a_producer_module_importing_task_code_breaks_the_contracts(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "producer" / "resets.py").write_text(
        (REPO / "producer" / "resets.py").read_text() + "\nfrom tasks import resets as _tasks_resets  # noqa\n")
    (tmp_path / "models" / "jobs.py").write_text(
        (REPO / "models" / "jobs.py").read_text() + "\nimport workers  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "producer.resets -> tasks.resets" in result.stdout
    assert "models.jobs -> workers" in result.stdout


def test_no_module_is_too_long_to_read_whole():
    too_long = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            relative = path.relative_to(REPO).as_posix()
            if "/migrations/" in relative or relative in ONE_JOB_EXCEPTIONS:
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                too_long[relative] = lines
    assert not too_long, too_long
