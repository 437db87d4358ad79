"""Helpers shared by the benchmark's scenarios: databases, configuration, logging."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("BENCH_REDIS_BASE_URL", "redis://127.0.0.1:6379")
# Set by ``python -m bench`` (a claimed DB number) unless given.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "")
# Database names start with this; give each benchmark on a shared host its own (two runs with one
# prefix drop each other's databases).
PREFIX = os.environ.get("BENCH_DB_PREFIX", "pr_bench")


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def admin(sql: str) -> None:
    engine = create_engine(ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def drop_db(name: str) -> None:
    admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' "
          "AND pid <> pg_backend_pid()")
    admin(f'DROP DATABASE IF EXISTS "{name}"')


def db_url(name: str) -> str:
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def copy_db(template: str, name: str) -> str:
    drop_db(name)
    # A large template (a year of history) is copied file by file: WAL_LOG, the default since
    # PostgreSQL 15, would write every page of it to the WAL.
    engine = create_engine(ADMIN_URL, poolclass=NullPool)
    with engine.connect() as conn:
        large = conn.execute(text("SELECT pg_database_size(:t) > 1073741824 AND current_setting('server_version_num')"
                                  "::int >= 150000"), {"t": template}).scalar()
    engine.dispose()
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"' + (" STRATEGY FILE_COPY" if large else ""))
    return db_url(name)


def configure(database_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Point this process (settings, engine, Celery app) at ``database_url``; return the workers' env."""
    env = {"DATABASE_URL": database_url, "CELERY_BROKER_URL": REDIS_URL, "LOG_FORMAT": "json",
           "NOTIFY_BACKEND": "console", "NOTIFY_RATE_PER_SECOND": "1000000", **(extra or {})}
    os.environ.update(env)
    from workers.app import reconfigure

    reconfigure()
    return env


def time_floor(base: str, courses: list[int]) -> float:
    """Seconds for the floor of each course (one set-based transaction each, one after another),
    on a fresh copy of ``base``."""
    from bench.floor import run_floor
    from models.db import dispose_engine, session_scope

    configure(copy_db(base, f"{PREFIX}_run"))
    started = time.perf_counter()
    for course in courses:
        with session_scope() as session:
            run_floor(session, course)
    seconds = time.perf_counter() - started
    dispose_engine()
    return seconds


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
