"""PostgreSQL roles made by tests: named after the test process, dropped at the end.

Roles are cluster-wide, unlike the per-process databases, so a role carries this
process's pid in its name (``pr_t<pid>_<suffix>``), is dropped at teardown after its
grants in every database are removed, and the roles of test processes that died are
dropped when the next one starts (as their databases are).
"""

from __future__ import annotations

import os
import re

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.conftest import _pid_alive


def process_role_name(suffix: str) -> str:
    return f"pr_t{os.getpid()}_{suffix}"


def url_as(url: str, role: str, password: str | None = None) -> str:
    """``url`` with another user (and password)."""
    return make_url(url).set(username=role, password=password).render_as_string(hide_password=False)


def _run(url: str, statement: str, params: dict | None = None) -> list:
    """One statement in autocommit; the rows it returns (none for a command)."""
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(text(statement), params or {})
            return result.all() if result.returns_rows else []
    finally:
        engine.dispose()


def drop_role(admin_url: str, role: str) -> None:
    """Remove the role's grants in every database that holds some, then the role; no error if missing."""
    found = _run(admin_url, "SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid "
                            "JOIN pg_database d ON d.oid = s.dbid WHERE r.rolname = :role", {"role": role})
    quoted = '"' + role.replace('"', '""') + '"'
    for (database,) in found:
        _run(make_url(admin_url).set(database=database).render_as_string(hide_password=False),
             f"DROP OWNED BY {quoted}")
    _run(admin_url, f"DROP ROLE IF EXISTS {quoted}")


def drop_stale_test_roles(admin_url: str) -> None:
    """Drop the roles of test processes of this machine that are no longer running."""
    if make_url(admin_url).host not in {None, "127.0.0.1", "localhost", "::1"}:
        return
    names = _run(admin_url, "SELECT rolname FROM pg_roles WHERE rolname LIKE 'pr\\_t%'")
    for (name,) in names:
        match = re.fullmatch(r"pr_t(\d+)_\w+", name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            drop_role(admin_url, name)

