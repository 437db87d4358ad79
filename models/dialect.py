"""The differences between PostgreSQL and SQLite (the embedded default), in one small module.

Domain code asks these helpers instead of branching on the dialect name itself, so every
place where the two databases are treated differently is listed here or calls in here.
"""

from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

POSTGRESQL = "postgresql"


def is_postgres(session: Session) -> bool:
    """True on PostgreSQL (row locks, ``SKIP LOCKED``, data-modifying CTEs, COPY, parallel
    writers); False on SQLite, which serialises writers and has none of those."""
    return session.get_bind().dialect.name == POSTGRESQL


def insert(session: Session, table: Table):
    """``INSERT`` of the session's dialect, which offers ``on_conflict_do_nothing`` / ``_do_update``."""
    return (postgresql if is_postgres(session) else sqlite).insert(table)
