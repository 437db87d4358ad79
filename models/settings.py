"""The one settings object, built from the environment once.

It sits in ``models`` because every layer reads it and ``models`` depends on
nothing of ours; nothing else in the project reads ``os.environ``.

With nothing set, the *embedded default* applies: a SQLite file and a
filesystem Celery broker under ``PROGRESS_RESET_DATA_DIR`` (``./data``), so the
demo runs on a bare machine with real worker processes. Point
``DATABASE_URL`` at PostgreSQL and ``CELERY_BROKER_URL`` at Redis for
production.

Each field states its environment variable (``validation_alias``), default and
bounds on one line, so the check and the message that names the variable
cannot drift apart. Names are matched exactly and an empty value means the
default, for every variable. A malformed value raises :class:`SettingsError`
naming the variable, which the CLI prints as one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars


class SettingsError(ValueError):
    """A configuration value is malformed."""


class _Environ(EnvSettingsSource):
    """The environment source, over a given mapping instead of the process environment.

    Tests and tools build settings from a dict without touching ``os.environ``;
    everything else (exact names, empty means unset) is the library's.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class Settings(BaseSettings):
    """Build with :meth:`from_env` (or :func:`get_settings`), which report malformed values by variable."""

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,
        env_ignore_empty=True,
        # Derived values (database URL, Redis URL) are computed by validators, also from defaults.
        validate_default=True,
        # "inf" or "nan" as a timeout or a rate is a typo, not a wish.
        allow_inf_nan=False,
    )

    data_dir: Path = Field(Path("data"), validation_alias="PROGRESS_RESET_DATA_DIR")
    # Empty: the embedded SQLite file under data_dir.
    database_url: str = Field("", validation_alias="DATABASE_URL")
    broker_url: str = Field("filesystem://", validation_alias="CELERY_BROKER_URL")
    # Reset pipeline
    batch_size: int = Field(5000, ge=1, validation_alias="RESET_BATCH_SIZE")
    purge_chunk_rows: int = Field(50000, ge=1, validation_alias="RESET_PURGE_CHUNK_ROWS")
    purge_partitions: int = Field(4, ge=1, validation_alias="RESET_PURGE_PARTITIONS")
    # A component of a course with fewer earlier rows than this is cleared inside the learner
    # batches; from this many on, by the deferred purge in id order (decision record 0005).
    purge_min_rows: int = Field(250000, ge=0, validation_alias="RESET_PURGE_MIN_ROWS")
    # Units of one job that may run at once (wake-up messages published per job).
    work_tokens: int = Field(4, ge=1, validation_alias="RESET_WORK_TOKENS")
    # How long one task's loop may hold a worker slot before it hands the rest back to the queue.
    task_slice_seconds: float = Field(1.0, ge=0.05, validation_alias="TASK_SLICE_SECONDS")
    batch_max_attempts: int = Field(5, ge=1, validation_alias="RESET_BATCH_MAX_ATTEMPTS")
    batch_lease_seconds: int = Field(120, ge=1, validation_alias="RESET_BATCH_LEASE_SECONDS")
    token_ttl_seconds: int = Field(900, ge=1, validation_alias="RESET_TOKEN_TTL_SECONDS")
    # Retraining campaigns: occurrences closer than this are refused.
    campaign_min_interval_seconds: int = Field(86400, ge=60, validation_alias="CAMPAIGN_MIN_INTERVAL_SECONDS")
    job_stale_seconds: int = Field(300, ge=1, validation_alias="RESET_JOB_STALE_SECONDS")
    publish_stale_seconds: int = Field(60, ge=1, validation_alias="PUBLISH_STALE_SECONDS")
    sweep_interval_seconds: float = Field(30.0, ge=0.1, validation_alias="SWEEP_INTERVAL_SECONDS")
    # Broker: a Redis message unacked this long is delivered again. It must be
    # longer than any task's time limit and any retry countdown.
    visibility_timeout_seconds: int = Field(3600, ge=10, validation_alias="BROKER_VISIBILITY_TIMEOUT_SECONDS")
    task_time_limit_seconds: int = Field(900, ge=1, validation_alias="TASK_TIME_LIMIT_SECONDS")
    # Notifications
    notify_backend: Literal["console", "smtp", "webhook"] = Field("console", validation_alias="NOTIFY_BACKEND")
    notify_console_path: str = Field("", validation_alias="NOTIFY_CONSOLE_PATH")
    notify_rate_per_second: float = Field(50.0, ge=0.01, validation_alias="NOTIFY_RATE_PER_SECOND")
    notify_max_attempts: int = Field(8, ge=1, validation_alias="NOTIFY_MAX_ATTEMPTS")
    notify_chunk_size: int = Field(50, ge=1, validation_alias="NOTIFY_CHUNK_SIZE")
    notify_stale_seconds: int = Field(300, ge=1, validation_alias="NOTIFY_STALE_SECONDS")
    course_base_url: str = Field("https://training.example.com/courses", validation_alias="COURSE_BASE_URL")
    smtp_host: str = Field("127.0.0.1", validation_alias="SMTP_HOST")
    smtp_port: int = Field(25, ge=1, validation_alias="SMTP_PORT")
    smtp_starttls: bool = Field(False, validation_alias="SMTP_STARTTLS")
    smtp_username: str = Field("", validation_alias="SMTP_USERNAME")
    # Passwords and secrets (repr=False) stay out of a logged or printed Settings.
    smtp_password: str = Field("", validation_alias="SMTP_PASSWORD", repr=False)
    smtp_from: str = Field("training@example.com", validation_alias="SMTP_FROM")
    smtp_timeout_seconds: float = Field(10.0, ge=0.1, validation_alias="SMTP_TIMEOUT_SECONDS")
    webhook_url: str = Field("", validation_alias="WEBHOOK_URL")
    webhook_secret: str = Field("", validation_alias="WEBHOOK_SECRET", repr=False)
    webhook_timeout_seconds: float = Field(10.0, ge=0.1, validation_alias="WEBHOOK_TIMEOUT_SECONDS")
    # Job events for subscribing services (webhook endpoints, queue ``webhooks``)
    webhooks_allow_http_loopback: bool = Field(False, validation_alias="WEBHOOKS_ALLOW_HTTP_LOOPBACK")
    webhooks_timeout_seconds: float = Field(5.0, ge=0.1, validation_alias="WEBHOOKS_TIMEOUT_SECONDS")
    webhooks_max_attempts: int = Field(10, ge=1, validation_alias="WEBHOOKS_MAX_ATTEMPTS")
    webhooks_retry_base_seconds: float = Field(10.0, ge=0.01, validation_alias="WEBHOOKS_RETRY_BASE_SECONDS")
    webhooks_retry_max_seconds: float = Field(21600.0, ge=1.0, validation_alias="WEBHOOKS_RETRY_MAX_SECONDS")
    # Retention (models/retention.py): finished rows are removed after this many days.
    retention_notifications_days: int = Field(30, ge=1, validation_alias="RETENTION_NOTIFICATIONS_DAYS")
    retention_webhooks_days: int = Field(30, ge=1, validation_alias="RETENTION_WEBHOOKS_DAYS")
    retention_batches_days: int = Field(30, ge=1, validation_alias="RETENTION_BATCHES_DAYS")
    # A finished job leaves once its notifications and batches are past their own windows.
    retention_jobs_days: int = Field(365, ge=1, validation_alias="RETENTION_JOBS_DAYS")
    retention_chunk_rows: int = Field(5000, ge=1, validation_alias="RETENTION_CHUNK_ROWS")
    # Operations. Empty redis_url: the broker's, when the broker is Redis.
    redis_url: str = Field("", validation_alias="REDIS_URL")
    flower_user: str = Field("", validation_alias="FLOWER_USER")
    flower_password: str = Field("", validation_alias="FLOWER_PASSWORD", repr=False)
    http_host: str = Field("127.0.0.1", validation_alias="HTTP_HOST")
    http_port: int = Field(8080, ge=1, validation_alias="HTTP_PORT")
    log_format: Literal["json", "text"] = Field("json", validation_alias="LOG_FORMAT")

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Relative to where the program started, so a later chdir moves nothing.
        return value.resolve()

    @field_validator("database_url")
    @classmethod
    def _psycopg_url(cls, value: str, info: ValidationInfo) -> str:
        # psycopg 3 is the driver installed; SQLAlchemy's bare postgresql:// would ask for psycopg2.
        if not value:
            value = f"sqlite:///{info.data.get('data_dir', Path('data')) / 'progress_reset.db'}"
        for scheme in ("postgres://", "postgresql://"):
            if value.startswith(scheme):
                value = "postgresql+psycopg://" + value[len(scheme):]
        if not (value.startswith("sqlite") or value.startswith("postgresql")):
            raise ValueError(f"must be a postgresql:// or sqlite:/// URL, got {value.split(':')[0]!r}")
        return value

    @field_validator("notify_backend", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        # NOTIFY_BACKEND=SMTP and LOG_FORMAT=TEXT are meant, not malformed.
        return value.lower() if isinstance(value, str) else value

    @field_validator("course_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        # Notifications append "/<course id>".
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _broker_redis_by_default(cls, value: str, info: ValidationInfo) -> str:
        broker_url = info.data.get("broker_url", "")
        return value or (broker_url if broker_url.startswith("redis") else "")

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

    def with_overrides(self, **changes: Any) -> "Settings":
        """A copy with some attributes replaced, unchecked (tests and tools build these)."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"Settings has no attribute {', '.join(unknown)}")
        return self.model_copy(update=changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Settings from ``env`` (default: the process environment); :class:`SettingsError` if malformed."""
        # Only this environment: no .env file, secrets folder or other source is read.
        source = _Environ(cls, os.environ if env is None else env)
        try:
            return cls(_build_sources=((source,), {}))
        except ValidationError as exc:
            raise SettingsError("; ".join(_describe(error) for error in exc.errors())) from None


def _describe(error: Any) -> str:
    """``<VARIABLE> must be ...``: pydantic's error, in the terms of the environment variable."""
    variable = str(error["loc"][0]) if error["loc"] else "configuration"
    kind, raw, context = error["type"], error["input"], error.get("ctx") or {}
    if kind == "value_error":
        problem = str(context["error"])
    elif kind in {"int_parsing", "int_from_float", "int_type"}:
        problem = f"must be a whole number, got {raw!r}"
    elif kind in {"float_parsing", "float_type", "finite_number"}:
        problem = f"must be a number, got {raw!r}"
    elif kind == "greater_than_equal":
        problem = f"must be at least {context['ge']}, got {raw}"
    elif kind == "bool_parsing":
        problem = f"must be true or false, got {raw!r}"
    elif kind == "literal_error":
        problem = f"must be {context['expected'].replace(chr(39), '')}, got {raw!r}"
    else:
        problem = f"is malformed: {error['msg']}"
    return f"{variable} {problem}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests and the CLI change the environment)."""
    get_settings.cache_clear()


__all__ = ["Settings", "SettingsError", "get_settings", "reset_settings_cache"]
