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
import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars


_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class SettingsError(ValueError):
    """A configuration value is malformed."""


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# The span exporters installed (models/tracing.py).
TRACE_EXPORTERS = ("otlp", "console")


def is_redis_url(url: str) -> bool:
    """True for a Redis URL (TCP, TLS or a unix socket); the first of several ``;``-separated
    broker URLs (fail-over) decides."""
    return url.split(";")[0].strip().startswith(REDIS_SCHEMES)


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
    # Least privilege (PostgreSQL): the role the API, workers and beat connect as. ``db upgrade``,
    # run as the tables' owner, creates it when missing and grants it what the code needs.
    database_app_role: str = Field("", validation_alias="DATABASE_APP_ROLE")
    database_app_password: str = Field("", validation_alias="DATABASE_APP_PASSWORD", repr=False)
    # Connections: each process's pool, and whether psycopg may prepare statements on the server
    # (false behind a transaction-pooling PgBouncer that does not track them, docs/operations.md).
    database_pool_size: int = Field(5, ge=1, validation_alias="DATABASE_POOL_SIZE")
    database_max_overflow: int = Field(5, ge=0, validation_alias="DATABASE_MAX_OVERFLOW")
    database_prepared_statements: bool = Field(True, validation_alias="DATABASE_PREPARED_STATEMENTS")
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
    sweep_interval_seconds: float = Field(10.0, ge=0.1, validation_alias="SWEEP_INTERVAL_SECONDS")
    # Broker: a Redis message unacked this long is delivered again. It must be
    # longer than any task's time limit and any retry countdown.
    visibility_timeout_seconds: int = Field(3600, ge=10, validation_alias="BROKER_VISIBILITY_TIMEOUT_SECONDS")
    # RabbitMQ (an amqp:// broker): the type the project's queues are declared with.
    rabbitmq_queue_type: Literal["quorum", "classic"] = Field("quorum", validation_alias="RABBITMQ_QUEUE_TYPE")
    task_time_limit_seconds: int = Field(900, ge=1, validation_alias="TASK_TIME_LIMIT_SECONDS")
    # Notifications
    notify_backend: Literal["console", "smtp", "webhook"] = Field("console", validation_alias="NOTIFY_BACKEND")
    notify_console_path: str = Field("", validation_alias="NOTIFY_CONSOLE_PATH")
    notify_rate_per_second: float = Field(50.0, ge=0.01, validation_alias="NOTIFY_RATE_PER_SECOND")
    notify_max_attempts: int = Field(8, ge=1, validation_alias="NOTIFY_MAX_ATTEMPTS")
    notify_chunk_size: int = Field(50, ge=1, validation_alias="NOTIFY_CHUNK_SIZE")
    course_base_url: str = Field("https://training.example.com/courses", validation_alias="COURSE_BASE_URL")
    smtp_host: str = Field("127.0.0.1", validation_alias="SMTP_HOST")
    smtp_port: int = Field(25, ge=1, validation_alias="SMTP_PORT")
    smtp_starttls: bool = Field(False, validation_alias="SMTP_STARTTLS")
    smtp_username: str = Field("", validation_alias="SMTP_USERNAME")
    # Passwords and secrets (repr=False) stay out of a logged or printed Settings.
    smtp_password: str = Field("", validation_alias="SMTP_PASSWORD", repr=False)
    smtp_from: str = Field("training@example.com", validation_alias="SMTP_FROM")
    smtp_timeout_seconds: float = Field(10.0, ge=0.1, validation_alias="SMTP_TIMEOUT_SECONDS")
    # The ``webhook`` notification backend (a provider's HTTP endpoint). Its variables were named
    # WEBHOOK_* before job events got their own WEBHOOKS_*; the old names are still read (and warned of).
    notify_webhook_url: str = Field("", validation_alias=AliasChoices("NOTIFY_WEBHOOK_URL", "WEBHOOK_URL"))
    notify_webhook_secret: str = Field("", validation_alias=AliasChoices("NOTIFY_WEBHOOK_SECRET", "WEBHOOK_SECRET"),
                                       repr=False)
    notify_webhook_timeout_seconds: float = Field(
        10.0, ge=0.1, validation_alias=AliasChoices("NOTIFY_WEBHOOK_TIMEOUT_SECONDS", "WEBHOOK_TIMEOUT_SECONDS"))
    # Calls out of the system (webhook deliveries, notification sends) run on background threads
    # of the worker process that claimed them, never in a pool slot (decision record 0009).
    # 0: each call inside the task that claimed it (for comparison only; decision record 0009).
    outbound_concurrency: int = Field(8, ge=0, validation_alias="OUTBOUND_CONCURRENCY")
    webhooks_per_organization: int = Field(2, ge=1, validation_alias="WEBHOOKS_PER_ORGANIZATION")
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
    # RabbitMQ's management HTTP API, read by Flower's Broker page; empty: the broker host's port 15672.
    rabbitmq_management_url: str = Field("", validation_alias="RABBITMQ_MANAGEMENT_URL", repr=False)
    http_host: str = Field("127.0.0.1", validation_alias="HTTP_HOST")
    http_port: int = Field(8080, ge=1, validation_alias="HTTP_PORT")
    log_format: Literal["json", "text"] = Field("json", validation_alias="LOG_FORMAT")
    # Metrics: organizations with a label value of their own (the first ones observed); the rest are "other".
    metrics_organization_labels: int = Field(20, ge=0, validation_alias="METRICS_ORGANIZATION_LABELS")
    # Tracing (OpenTelemetry). Only what decides "on or off" is read here (see tracing_exporters);
    # the SDK reads the other OTEL_* variables (service name, sampler, batching, headers) itself.
    otel_sdk_disabled: bool = Field(False, validation_alias="OTEL_SDK_DISABLED")
    otel_traces_exporter: str = Field("", validation_alias="OTEL_TRACES_EXPORTER")
    otel_exporter_otlp_endpoint: str = Field("", validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_exporter_otlp_traces_endpoint: str = Field("", validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    # Only the OTLP exporter over HTTP is installed (port 4318); gRPC would fail at every export.
    otel_exporter_otlp_protocol: Literal["http/protobuf"] = Field(
        "http/protobuf", validation_alias="OTEL_EXPORTER_OTLP_PROTOCOL")
    otel_exporter_otlp_traces_protocol: Literal["http/protobuf"] = Field(
        "http/protobuf", validation_alias="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")

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

    @field_validator("database_app_role")
    @classmethod
    def _role_name(cls, value: str) -> str:
        # Lowercase, so the name in DATABASE_URL and the role PostgreSQL folds it to are the same.
        if value and (not _ROLE_NAME.fullmatch(value) or value.startswith("pg_") or value == "public"):
            raise ValueError(f"must be a PostgreSQL role name (lowercase letters, digits and _, at most 63, "
                             f"not starting with a digit, pg_ or public), got {value[:70]!r}")
        return value

    @field_validator("database_app_password")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain the NUL character")
        return value

    @field_validator("notify_backend", "log_format", "rabbitmq_queue_type", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        # NOTIFY_BACKEND=SMTP and LOG_FORMAT=TEXT are meant, not malformed.
        return value.lower() if isinstance(value, str) else value

    @field_validator("otel_traces_exporter")
    @classmethod
    def _known_exporters(cls, value: str) -> str:
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in TRACE_EXPORTERS + ("none",)]
        if unknown or ("none" in names and len(names) > 1):
            raise ValueError(f"must be otlp, console, both separated by a comma, or none; got {value!r}")
        return ",".join(names)

    @field_validator("course_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        # Notifications append "/<course id>".
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _broker_redis_by_default(cls, value: str, info: ValidationInfo) -> str:
        broker_url = info.data.get("broker_url", "")
        return value or (broker_url if is_redis_url(broker_url) else "")

    @field_validator("rabbitmq_management_url")
    @classmethod
    def _http_api_folder(cls, value: str) -> str:
        url = urlsplit(value)  # never echoed in the error: it may hold a password
        if value and (url.scheme not in ("http", "https") or not url.hostname):
            raise ValueError("must be an http:// or https:// URL such as http://rabbitmq:15672/api/")
        # Flower joins "queues/<vhost>" to it: without the trailing slash the last segment would be lost.
        return value if not value or value.endswith("/") else value + "/"

    @property
    def tracing_exporters(self) -> tuple[str, ...]:
        """Where spans go; empty: tracing is off. The one place that decides it.

        Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an OTLP
        endpoint is set (then ``otlp``); ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``
        turn it off whatever else is set.
        """
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return ()
        if self.otel_traces_exporter:
            return tuple(self.otel_traces_exporter.split(","))
        if self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint:
            return ("otlp",)
        return ()

    @property
    def embedded(self) -> bool:
        """True when running on the embedded default (SQLite + filesystem broker)."""
        return self.database_url.startswith("sqlite")

    @property
    def broker_is_redis(self) -> bool:
        return is_redis_url(self.broker_url)

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def is_rabbitmq(self) -> bool:
        """True when the (first) broker URL is RabbitMQ's (``amqp://``, ``amqps://``, ``pyamqp://``)."""
        return self.broker_url.split(";")[0].strip().startswith(("amqp://", "amqps://", "pyamqp://"))

    @property
    def countdown_step_seconds(self) -> float:
        """The finest countdown the broker delivers a message by: whole seconds on RabbitMQ's
        quorum queues (native delayed delivery; ``workers.rabbitmq.whole_seconds`` rounds up),
        otherwise none (0: as given)."""
        return 1.0 if self.is_rabbitmq and self.rabbitmq_queue_type == "quorum" else 0.0

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
        environ = os.environ if env is None else env
        source = _Environ(cls, environ)
        try:
            settings = cls(_build_sources=((source,), {}))
        except ValidationError as exc:
            raise SettingsError("; ".join(_describe(error, environ) for error in exc.errors())) from None
        _warn_of_renamed(environ)
        return settings


# Variables read under an older name: old name -> current name.
RENAMED = {
    "WEBHOOK_URL": "NOTIFY_WEBHOOK_URL",
    "WEBHOOK_SECRET": "NOTIFY_WEBHOOK_SECRET",
    "WEBHOOK_TIMEOUT_SECONDS": "NOTIFY_WEBHOOK_TIMEOUT_SECONDS",
}


def _warn_of_renamed(environ: Mapping[str, str]) -> None:
    """One warning per variable still set under its older name (it is read all the same)."""
    for old, new in RENAMED.items():
        if environ.get(old):
            warnings.warn(f"{old} is deprecated and will stop being read; set {new} instead", FutureWarning,
                          stacklevel=3)


def _describe(error: Any, environ: Mapping[str, str]) -> str:
    """``<VARIABLE> must be ...``: pydantic's error, in the terms of the environment variable that was set."""
    variable = str(error["loc"][0]) if error["loc"] else "configuration"
    if not environ.get(variable):
        variable = next((old for old, new in RENAMED.items() if new == variable and environ.get(old)), variable)
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


__all__ = ["Settings", "SettingsError", "get_settings", "is_redis_url", "reset_settings_cache"]
