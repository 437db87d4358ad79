"""The layout's rules, checked: the dependency direction and the absence of import cycles
(import-linter, as `make lint` runs it), no star imports, modules small enough to read whole,
and Celery tasks thin enough to read at a glance."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("models", "tasks", "workers", "producer")
CONTRACTS = 4
# A module this long does one job only (a reader still finds everything in it by its name).
MAX_LINES = 450
ONE_JOB_EXCEPTIONS = {
    "models/schema.py": "the table definitions, one class per table",
}
# A task turns ids into one call; its body (docstring aside) fits on a screen's corner.
MAX_TASK_BODY_LINES = 15


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(root: Path, module: str, text: str) -> None:
    path = root / module
    path.write_text(path.read_text() + text)


def _modules():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if "/migrations/" not in relative:
                yield relative, path


def test_the_dependency_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in result.stdout


def test_a_producer_module_importing_task_code_breaks_the_contracts(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root, "producer/resets.py", "\nfrom tasks.resets import tasks as _reset_tasks  # noqa\n")
    _append(root, "models/jobs.py", "\nimport workers  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "producer.resets -> tasks.resets.tasks" in result.stdout
    assert "models.jobs -> workers" in result.stdout


def test_an_import_cycle_breaks_the_contracts_even_inside_a_function(tmp_path):
    root = _copy_tree(tmp_path)
    # models.job_events imports models.job_status at the top; the way back is hidden in a function.
    _append(root, "models/job_status.py", "\n\ndef _late():\n    from models import job_events  # noqa\n")
    # And one between task modules of one package.
    _append(root, "tasks/resets/progress.py", "\n\ndef _late():\n    from tasks.resets import finalize  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "No import cycles between modules, imports inside functions included BROKEN" in result.stdout
    assert "No cycles are allowed in models." in result.stdout
    assert "No cycles are allowed in tasks.resets." in result.stdout


def test_no_star_imports():
    starred = [f"{relative}:{node.lineno}" for relative, path in _modules()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names)]
    assert not starred, starred


def test_no_module_is_too_long_to_read_whole():
    too_long = {relative: lines for relative, path in _modules()
                if relative not in ONE_JOB_EXCEPTIONS and (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, too_long


def _is_task(node: ast.FunctionDef) -> bool:
    def name(decorator):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
    return any(name(d) in ("project_task", "shared_task", "task") for d in node.decorator_list)


def test_every_task_body_is_a_few_lines():
    tasks_found = {}
    for relative, path in _modules():
        if not relative.startswith("tasks/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and _is_task(node):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                tasks_found[f"{relative}:{node.name}"] = body[-1].end_lineno - body[0].lineno + 1
    assert len(tasks_found) >= 8, tasks_found  # every family's entry points were found
    too_long = {name: lines for name, lines in tasks_found.items() if lines > MAX_TASK_BODY_LINES}
    assert not too_long, too_long
