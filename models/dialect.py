"""The differences between PostgreSQL and SQLite (the embedded default), in one small module.

Domain code asks these helpers instead of branching on the dialect name itself, so every
place where the two databases are treated differently is listed here or calls in here.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from sqlalchemy import ColumnElement, Integer, Table, any_, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

POSTGRESQL = "postgresql"


def is_postgres(session: Session) -> bool:
    """True on PostgreSQL (row locks, ``SKIP LOCKED``, data-modifying CTEs, COPY, parallel
    writers); False on SQLite, which serialises writers and has none of those."""
    return session.get_bind().dialect.name == POSTGRESQL


def insert(session: Session, table: Table):
    """``INSERT`` of the session's dialect, which offers ``on_conflict_do_nothing`` / ``_do_update``."""
    return (postgresql if is_postgres(session) else sqlite).insert(table)


def in_ids(session: Session, column, ids: Sequence[int],
           element_type: type[TypeEngine] = Integer) -> ColumnElement[bool]:
    """``column IN ids``: one array parameter on PostgreSQL (one statement text and plan whatever
    the number of ids), an expanded list of parameters on SQLite, which has no arrays."""
    if is_postgres(session):
        return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(element_type)))
    return column.in_(list(ids))


class LockSpace(IntEnum):
    """What a :func:`hold_transaction_lock` key names: one space per kind of object, so keys never collide."""

    COURSE_ACTIVATION = 0x70720001  # a job of the course being activated (models.jobs)
    WEBHOOK_ENDPOINTS = 0x70720002  # an organization's endpoints being counted and added (producer.webhooks)
    IDEMPOTENCY_KEYS = 0x70720003  # a request made with an actor's idempotency key (producer.idempotency)


def hold_transaction_lock(session: Session, namespace: LockSpace, key: int) -> None:
    """Wait for the lock named ``(namespace, key)`` and hold it until the transaction ends.

    PostgreSQL: a transaction-level advisory lock. Unlike a row lock (``FOR UPDATE`` needs the
    UPDATE privilege on the table) it needs no privilege, and it ends with the transaction, so
    it also holds behind a transaction-pooling PgBouncer. SQLite serialises writers
    (``BEGIN IMMEDIATE``): the transaction already holds the only write lock.
    """
    if is_postgres(session):
        session.execute(select(func.pg_advisory_xact_lock(int(namespace), key)))


def try_transaction_lock(session: Session, namespace: LockSpace, key: int) -> bool:
    """Take the lock named ``(namespace, key)`` for the rest of the transaction if it is free; False if
    another transaction holds it (no waiting). SQLite: always True (see :func:`hold_transaction_lock`)."""
    if not is_postgres(session):
        return True
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(int(namespace), key))))
