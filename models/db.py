"""Engine and session: one ``sessionmaker`` per process, one way to scope a transaction.

Functions that do work take a ``Session`` and never commit; the caller owns the
transaction with :func:`session_scope`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from models.settings import get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None
_engine_pid: int | None = None
# Called with each engine the process builds (tracing instruments it: models/tracing.py).
_engine_listeners: list[Callable[[Engine], None]] = []


def on_new_engine(listener: Callable[[Engine], None]) -> None:
    """Call ``listener(engine)`` for every engine :func:`get_engine` builds from now on."""
    if listener not in _engine_listeners:
        _engine_listeners.append(listener)


def make_engine(url: str, **kwargs) -> Engine:
    """Build an engine with the settings each dialect needs.

    On PostgreSQL the pool (``DATABASE_POOL_SIZE`` + ``DATABASE_MAX_OVERFLOW``) and prepared
    statements (``DATABASE_PREPARED_STATEMENTS``) follow the settings unless ``kwargs`` say otherwise.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            # Let pysqlite not open transactions implicitly; we emit BEGIN
            # IMMEDIATE ourselves so writers queue instead of failing.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - trivial
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    settings = get_settings()
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", settings.database_pool_size)
        kwargs.setdefault("max_overflow", settings.database_max_overflow)
    if not settings.database_prepared_statements:
        # psycopg prepares a statement on the server after its fifth execution on a connection.
        # Behind a transaction-pooling PgBouncer the next transaction may run on another server
        # connection, where that statement does not exist (or another client's of the same name
        # does): never prepare.
        kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "prepare_threshold": None}
    return create_engine(url, **kwargs)


def get_engine() -> Engine:
    """The process's engine, rebuilt after a fork (pooled connections are never shared)."""
    global _engine, _sessionmaker, _engine_pid
    with _lock:
        if _engine is None or _engine_pid != os.getpid():
            if _engine is not None:
                _engine.dispose(close=False)
            _engine = make_engine(get_settings().database_url)
            for listener in _engine_listeners:
                listener(_engine)
            _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
            _engine_pid = os.getpid()
        return _engine


def get_sessionmaker() -> sessionmaker[Session]:
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker


def dispose_engine() -> None:
    """Forget the engine (after a fork, or when tests switch databases)."""
    global _engine, _sessionmaker, _engine_pid
    with _lock:
        if _engine is not None:
            _engine.dispose(close=_engine_pid == os.getpid())
        _engine = None
        _sessionmaker = None
        _engine_pid = None


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with get_sessionmaker().begin() as session:
        yield session
