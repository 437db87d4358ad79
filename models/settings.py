"""The one settings object, built from the environment once.

It sits in ``models`` because every layer reads it and ``models`` depends on
nothing of ours; nothing else in the project reads ``os.environ``.

With nothing set, the *embedded default* applies: a SQLite file and a
filesystem Celery broker under ``PROGRESS_RESET_DATA_DIR`` (``./data``), so the
demo runs on a bare machine with real worker processes. Point
``DATABASE_URL`` at PostgreSQL and ``CELERY_BROKER_URL`` at Redis for
production.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path


class SettingsError(ValueError):
    """A configuration value is malformed."""


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str
    # Reset pipeline
    batch_size: int = 5000
    purge_chunk_rows: int = 50000
    purge_partitions: int = 4
    # A component of a course with fewer earlier rows than this is cleared inside the learner
    # batches; from this many on, by the deferred purge in id order (decision record 0005).
    purge_min_rows: int = 250000
    # Units of one job that may run at once (wake-up messages published per job).
    work_tokens: int = 4
    # How long one task's loop may hold a worker slot before it hands the rest back to the queue.
    task_slice_seconds: float = 1.0
    batch_max_attempts: int = 5
    batch_lease_seconds: int = 120
    token_ttl_seconds: int = 900
    # Retraining campaigns: occurrences closer than this are refused.
    campaign_min_interval_seconds: int = 86400
    job_stale_seconds: int = 300
    publish_stale_seconds: int = 60
    sweep_interval_seconds: float = 30.0
    # Broker: a Redis message unacked this long is delivered again. It must be
    # longer than any task's time limit and any retry countdown.
    visibility_timeout_seconds: int = 3600
    task_time_limit_seconds: int = 900
    # Notifications
    notify_backend: str = "console"
    notify_console_path: str = ""
    notify_rate_per_second: float = 50.0
    notify_max_attempts: int = 8
    notify_chunk_size: int = 50
    notify_stale_seconds: int = 300
    course_base_url: str = "https://training.example.com/courses"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_from: str = "training@example.com"
    smtp_timeout_seconds: float = 10.0
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_timeout_seconds: float = 10.0
    # Job events for subscribing services (webhook endpoints, queue ``webhooks``)
    webhooks_allow_http_loopback: bool = False
    webhooks_timeout_seconds: float = 5.0
    webhooks_max_attempts: int = 10
    webhooks_retry_base_seconds: float = 10.0
    webhooks_retry_max_seconds: float = 21600.0
    # Operations
    redis_url: str = ""
    flower_user: str = ""
    flower_password: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    log_format: str = "json"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        """True when running on the embedded default (SQLite + filesystem broker)."""
        return self.database_url.startswith("sqlite")

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    def with_overrides(self, **changes: object) -> "Settings":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("PROGRESS_RESET_DATA_DIR") or "data").resolve()
        database_url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'progress_reset.db'}"
        if database_url.startswith("postgres://"):
            database_url = "postgresql+psycopg://" + database_url[len("postgres://"):]
        elif database_url.startswith("postgresql://"):
            database_url = "postgresql+psycopg://" + database_url[len("postgresql://"):]
        if not (database_url.startswith("sqlite") or database_url.startswith("postgresql")):
            raise SettingsError(
                f"DATABASE_URL must be a postgresql:// or sqlite:/// URL, got {database_url.split(':')[0]!r}"
            )
        broker_url = env.get("CELERY_BROKER_URL") or "filesystem://"
        backend = (env.get("NOTIFY_BACKEND") or "console").lower()
        if backend not in {"console", "smtp", "webhook"}:
            raise SettingsError(f"NOTIFY_BACKEND must be console, smtp or webhook, got {backend!r}")
        log_format = (env.get("LOG_FORMAT") or "json").lower()
        if log_format not in {"json", "text"}:
            raise SettingsError(f"LOG_FORMAT must be json or text, got {log_format!r}")
        redis_url = env.get("REDIS_URL") or (broker_url if broker_url.startswith("redis") else "")
        return cls(
            data_dir=data_dir,
            database_url=database_url,
            broker_url=broker_url,
            batch_size=_int(env, "RESET_BATCH_SIZE", 5000, minimum=1),
            purge_chunk_rows=_int(env, "RESET_PURGE_CHUNK_ROWS", 50000, minimum=1),
            purge_partitions=_int(env, "RESET_PURGE_PARTITIONS", 4, minimum=1),
            purge_min_rows=_int(env, "RESET_PURGE_MIN_ROWS", 250000, minimum=0),
            work_tokens=_int(env, "RESET_WORK_TOKENS", 4, minimum=1),
            task_slice_seconds=_float(env, "TASK_SLICE_SECONDS", 1.0, minimum=0.05),
            batch_max_attempts=_int(env, "RESET_BATCH_MAX_ATTEMPTS", 5, minimum=1),
            batch_lease_seconds=_int(env, "RESET_BATCH_LEASE_SECONDS", 120, minimum=1),
            token_ttl_seconds=_int(env, "RESET_TOKEN_TTL_SECONDS", 900, minimum=1),
            campaign_min_interval_seconds=_int(env, "CAMPAIGN_MIN_INTERVAL_SECONDS", 86400, minimum=60),
            job_stale_seconds=_int(env, "RESET_JOB_STALE_SECONDS", 300, minimum=1),
            publish_stale_seconds=_int(env, "PUBLISH_STALE_SECONDS", 60, minimum=1),
            sweep_interval_seconds=_float(env, "SWEEP_INTERVAL_SECONDS", 30.0, minimum=0.1),
            visibility_timeout_seconds=_int(env, "BROKER_VISIBILITY_TIMEOUT_SECONDS", 3600, minimum=10),
            task_time_limit_seconds=_int(env, "TASK_TIME_LIMIT_SECONDS", 900, minimum=1),
            notify_backend=backend,
            notify_console_path=env.get("NOTIFY_CONSOLE_PATH", ""),
            notify_rate_per_second=_float(env, "NOTIFY_RATE_PER_SECOND", 50.0, minimum=0.01),
            notify_max_attempts=_int(env, "NOTIFY_MAX_ATTEMPTS", 8, minimum=1),
            notify_chunk_size=_int(env, "NOTIFY_CHUNK_SIZE", 50, minimum=1),
            notify_stale_seconds=_int(env, "NOTIFY_STALE_SECONDS", 300, minimum=1),
            course_base_url=env.get("COURSE_BASE_URL", "https://training.example.com/courses").rstrip("/"),
            smtp_host=env.get("SMTP_HOST", "127.0.0.1"),
            smtp_port=_int(env, "SMTP_PORT", 25, minimum=1),
            smtp_starttls=_bool(env, "SMTP_STARTTLS", False),
            smtp_username=env.get("SMTP_USERNAME", ""),
            smtp_password=env.get("SMTP_PASSWORD", ""),
            smtp_from=env.get("SMTP_FROM", "training@example.com"),
            smtp_timeout_seconds=_float(env, "SMTP_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            webhook_url=env.get("WEBHOOK_URL", ""),
            webhook_secret=env.get("WEBHOOK_SECRET", ""),
            webhook_timeout_seconds=_float(env, "WEBHOOK_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            webhooks_allow_http_loopback=_bool(env, "WEBHOOKS_ALLOW_HTTP_LOOPBACK", False),
            webhooks_timeout_seconds=_float(env, "WEBHOOKS_TIMEOUT_SECONDS", 5.0, minimum=0.1),
            webhooks_max_attempts=_int(env, "WEBHOOKS_MAX_ATTEMPTS", 10, minimum=1),
            webhooks_retry_base_seconds=_float(env, "WEBHOOKS_RETRY_BASE_SECONDS", 10.0, minimum=0.01),
            webhooks_retry_max_seconds=_float(env, "WEBHOOKS_RETRY_MAX_SECONDS", 21600.0, minimum=1.0),
            redis_url=redis_url,
            flower_user=env.get("FLOWER_USER", ""),
            flower_password=env.get("FLOWER_PASSWORD", ""),
            http_host=env.get("HTTP_HOST", "127.0.0.1"),
            http_port=_int(env, "HTTP_PORT", 8080, minimum=1),
            log_format=log_format,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests and the CLI change the environment)."""
    get_settings.cache_clear()


__all__ = ["Settings", "SettingsError", "get_settings", "reset_settings_cache", "fields"]
