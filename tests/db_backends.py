"""``pipeline_db``: a Session on PostgreSQL, then on SQLite, for tests of code with a path per dialect.

The reset pipeline takes a different branch on SQLite, the embedded default (one statement per
part instead of one data-modifying statement, no row locks): tests that request ``pipeline_db``
run once on each. PostgreSQL is ``db_session`` (rolled back after the test). SQLite is a file
in the test's ``tmp_path``, copied from one database migrated once per test session with the
same Alembic migrations ``make demo`` applies (``models.migrate.upgrade``), opened with the
project's engine settings (WAL, ``BEGIN IMMEDIATE``).

Import the fixture into a test module: ``from tests.db_backends import pipeline_db  # noqa: F401``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

DIALECTS = ("postgresql", "sqlite")
_template: Path | None = None


def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test session's migrated SQLite database (migrated on first use)."""
    global _template
    if _template is None:
        from models.migrate import upgrade

        path = tmp_path_factory.mktemp("sqlite-template") / "progress_reset.db"
        upgrade(f"sqlite:///{path}")
        _template = path
    return _template


def sqlite_copy(template: Path, path: Path) -> str:
    """A copy of the migrated ``template`` at ``path`` (through SQLite's backup API, so pages still
    in the write-ahead log come along); returns its URL."""
    source, target = sqlite3.connect(template), sqlite3.connect(path)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    return f"sqlite:///{path}"


@pytest.fixture(params=DIALECTS)
def pipeline_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A Session on PostgreSQL (``db_session``), or on a fresh migrated SQLite file."""
    if request.param == "postgresql":
        yield request.getfixturevalue("db_session")
        return
    from models.db import make_engine

    template = sqlite_template(request.getfixturevalue("tmp_path_factory"))
    engine = make_engine(sqlite_copy(template, tmp_path / "progress_reset.db"))
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        engine.dispose()
