"""The benchmark's own code keeps up with the code it measures.

The benchmark is run by hand, rarely, and imports the project's functions inside its own
functions: a module moved or a signature changed shows up only when someone runs it, an hour
into a year of history. These checks fail in ``make test`` instead.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("models", "tasks", "workers", "producer", "bench")


def _project_imports() -> list[tuple[str, int, str, str | None]]:
    """(file, line, module, name) for every import of the project's code in ``bench/``, nested ones too."""
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] in PROJECT_PACKAGES:
                    found += [(path.name, node.lineno, node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.name, node.lineno, alias.name, None) for alias in node.names
                          if alias.name.split(".")[0] in PROJECT_PACKAGES]
    return found


def test_every_import_of_the_project_in_the_benchmark_resolves():
    imports = _project_imports()
    assert len(imports) > 20  # the walk found the nested imports too
    missing = []
    for file, line, module, name in imports:
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"bench/{file}:{line}: {module}: {exc}")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"bench/{file}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_history_explain_runs_every_query_family_on_a_real_database(fresh_db):
    """``python -m bench.history_explain`` calls each function the history measures and explains
    what it sent: on a seeded organization every family shows a plan and nothing raises."""
    url = fresh_db()
    env = {**os.environ, "DATABASE_URL": url}
    seeded = subprocess.run([sys.executable, "-m", "producer.cli", "seed", "--learners", "20", "--json"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0, seeded.stderr
    organization = str(json.loads(seeded.stdout)["organization_id"])

    done = subprocess.run([sys.executable, "-m", "bench.history_explain", url, organization, "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for family in ("fair pick: the queued job to start", "fair pick: the unit to run",
                   "notification claim, one job", "notification sweep", "webhook sweep",
                   "maintenance sweep (the rest)", "job list, first page, busiest organization",
                   "audit export, busiest organization, one month", "metrics scrape",
                   "retention chunk: notifications", "retention chunk: reset_jobs"):
        assert f"-- {family}:" in done.stdout, family
    assert "Execution Time:" in done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--history", "--help"]])
def test_the_benchmark_entry_point_starts(argv):
    done = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--history" in done.stdout
