"""The one settings object (models.settings.Settings.from_env), read from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydantic import AliasChoices

from models.settings import RENAMED, Settings, SettingsError, get_settings, reset_settings_cache


def _current_name(alias) -> str:
    return alias.choices[0] if isinstance(alias, AliasChoices) else alias


# Every environment variable Settings reads (under its current name), by attribute.
VARIABLES = {_current_name(field.validation_alias): name for name, field in Settings.model_fields.items()}

# The smallest value each numeric variable accepts.
MINIMUMS = {
    "RESET_BATCH_SIZE": 1, "METRICS_ORGANIZATION_LABELS": 0, "RESET_PURGE_CHUNK_ROWS": 1, "RESET_PURGE_PARTITIONS": 1, "RESET_PURGE_MIN_ROWS": 0,
    "RESET_WORK_TOKENS": 1, "TASK_SLICE_SECONDS": 0.05, "RESET_BATCH_MAX_ATTEMPTS": 1,
    "RESET_BATCH_LEASE_SECONDS": 1, "RESET_TOKEN_TTL_SECONDS": 1, "CAMPAIGN_MIN_INTERVAL_SECONDS": 60,
    "RESET_JOB_STALE_SECONDS": 1, "PUBLISH_STALE_SECONDS": 1, "SWEEP_INTERVAL_SECONDS": 0.1,
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": 10, "TASK_TIME_LIMIT_SECONDS": 1, "NOTIFY_RATE_PER_SECOND": 0.01,
    "NOTIFY_MAX_ATTEMPTS": 1, "NOTIFY_CHUNK_SIZE": 1, "SMTP_PORT": 1, "OUTBOUND_CONCURRENCY": 0,
    "WEBHOOKS_PER_ORGANIZATION": 1,
    "SMTP_TIMEOUT_SECONDS": 0.1, "NOTIFY_WEBHOOK_TIMEOUT_SECONDS": 0.1, "WEBHOOKS_TIMEOUT_SECONDS": 0.1,
    "WEBHOOKS_MAX_ATTEMPTS": 1, "WEBHOOKS_RETRY_BASE_SECONDS": 0.01, "WEBHOOKS_RETRY_MAX_SECONDS": 1.0,
    "HTTP_PORT": 1, "DATABASE_POOL_SIZE": 1, "DATABASE_MAX_OVERFLOW": 0, "RETENTION_NOTIFICATIONS_DAYS": 1,
    "RETENTION_WEBHOOKS_DAYS": 1, "RETENTION_BATCHES_DAYS": 1, "RETENTION_JOBS_DAYS": 1, "RETENTION_CHUNK_ROWS": 1,
}
WHOLE_NUMBERS = sorted(v for v, m in MINIMUMS.items() if isinstance(m, int))
NUMBERS = sorted(v for v, m in MINIMUMS.items() if isinstance(m, float))
SWITCHES = ["SMTP_STARTTLS", "WEBHOOKS_ALLOW_HTTP_LOOPBACK", "DATABASE_PREPARED_STATEMENTS"]


def test_nothing_set_is_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.data_dir == tmp_path / "data"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'progress_reset.db'}"
    assert s.broker_url == "filesystem://"
    assert s.embedded and not s.is_postgres
    assert s.broker_folder == tmp_path / "data" / "broker"
    assert s.redis_url == ""
    assert (s.batch_size, s.token_ttl_seconds, s.notify_backend, s.log_format) == (5000, 900, "console", "json")


def test_data_dir_moves_the_embedded_database_and_broker(tmp_path):
    s = Settings.from_env({"PROGRESS_RESET_DATA_DIR": str(tmp_path / "elsewhere")})
    assert s.database_url == f"sqlite:///{tmp_path / 'elsewhere' / 'progress_reset.db'}"
    assert s.broker_folder == tmp_path / "elsewhere" / "broker"


def test_empty_values_mean_the_default():
    s = Settings.from_env({"DATABASE_URL": "", "CELERY_BROKER_URL": "", "RESET_BATCH_SIZE": "", "SMTP_STARTTLS": ""})
    assert s.embedded and s.broker_url == "filesystem://" and s.batch_size == 5000 and s.smtp_starttls is False


@pytest.mark.parametrize(
    "given, expected",
    [
        ("postgres://u:p@db:5432/pr", "postgresql+psycopg://u:p@db:5432/pr"),
        ("postgresql://u@db/pr", "postgresql+psycopg://u@db/pr"),
        ("postgresql+psycopg://u@db/pr", "postgresql+psycopg://u@db/pr"),
    ],
)
def test_postgres_urls_use_psycopg_3(given, expected):
    s = Settings.from_env({"DATABASE_URL": given})
    assert s.database_url == expected and s.is_postgres and not s.embedded


def test_production_values_are_read():
    s = Settings.from_env({
        "DATABASE_URL": "postgresql://postgres@db/pr",
        "CELERY_BROKER_URL": "redis://redis:6379/0",
        "RESET_BATCH_SIZE": "500",
        "NOTIFY_BACKEND": "SMTP",
        "SMTP_STARTTLS": "yes",
        "NOTIFY_RATE_PER_SECOND": "2.5",
        "COURSE_BASE_URL": "https://lms.example.org/c/",
        "LOG_FORMAT": "text",
    })
    assert s.broker_url == "redis://redis:6379/0"
    assert s.redis_url == "redis://redis:6379/0", "the broker's Redis is the Redis by default"
    assert s.batch_size == 500 and s.notify_backend == "smtp" and s.smtp_starttls is True
    assert s.notify_rate_per_second == 2.5
    assert s.course_base_url == "https://lms.example.org/c"
    assert s.log_format == "text"


@pytest.mark.parametrize(
    "variable, value",
    [
        ("DATABASE_URL", "mysql://root@127.0.0.1/training"),
        ("RESET_BATCH_SIZE", "abc"),
        ("RESET_BATCH_SIZE", "0"),
        ("RESET_BATCH_MAX_ATTEMPTS", "-1"),
        ("RESET_TOKEN_TTL_SECONDS", "1.5"),
        ("SWEEP_INTERVAL_SECONDS", "fast"),
        ("BROKER_VISIBILITY_TIMEOUT_SECONDS", "5"),
        ("TASK_TIME_LIMIT_SECONDS", "0"),
        ("NOTIFY_BACKEND", "pigeon"),
        ("NOTIFY_RATE_PER_SECOND", "0"),
        ("SMTP_PORT", "smtp"),
        ("SMTP_STARTTLS", "maybe"),
        ("WEBHOOK_TIMEOUT_SECONDS", "-3"),
        ("HTTP_PORT", "eighty"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_malformed_values_name_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_every_numeric_variable_has_a_known_minimum():
    numeric = {v for v, name in VARIABLES.items() if Settings.model_fields[name].annotation in (int, float)}
    assert numeric == set(MINIMUMS)


@pytest.mark.parametrize("variable", WHOLE_NUMBERS)
@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_a_whole_number_variable_names_itself_when_malformed(variable, value):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value) == f"{variable} must be a whole number, got {value!r}"


@pytest.mark.parametrize("variable", NUMBERS)
@pytest.mark.parametrize("value", ["fast", "nan", "inf"])
def test_a_number_variable_names_itself_when_malformed(variable, value):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value) == f"{variable} must be a number, got {value!r}"


@pytest.mark.parametrize("variable, minimum", sorted(MINIMUMS.items()))
def test_bounds_accept_the_minimum_and_refuse_below_it(variable, minimum):
    assert getattr(Settings.from_env({variable: str(minimum)}), VARIABLES[variable]) == minimum
    below = minimum - 1 if isinstance(minimum, int) else minimum / 2
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: str(below)})
    assert str(refused.value) == f"{variable} must be at least {minimum}, got {below}"


@pytest.mark.parametrize("variable", SWITCHES)
def test_switches_read_true_and_false_and_refuse_anything_else(variable):
    attribute = VARIABLES[variable]
    for value in ("1", "true", "YES", "on"):
        assert getattr(Settings.from_env({variable: value}), attribute) is True
    for value in ("0", "False", "no", "off"):
        assert getattr(Settings.from_env({variable: value}), attribute) is False
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: "maybe"})
    assert str(refused.value) == f"{variable} must be true or false, got 'maybe'"


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("NOTIFY_BACKEND", "Pigeon", "NOTIFY_BACKEND must be console, smtp or webhook, got 'pigeon'"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be json or text, got 'xml'"),
        ("RABBITMQ_QUEUE_TYPE", "stream", "RABBITMQ_QUEUE_TYPE must be quorum or classic, got 'stream'"),
        ("DATABASE_URL", "mysql://root@127.0.0.1/training",
         "DATABASE_URL must be a postgresql:// or sqlite:/// URL, got 'mysql'"),
    ],
)
def test_choices_name_what_is_accepted(variable, value, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value) == message


def test_several_malformed_values_are_one_line_naming_each():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"RESET_BATCH_SIZE": "0", "SMTP_PORT": "smtp", "LOG_FORMAT": "xml"})
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("RESET_BATCH_SIZE must be at least 1, got 0; SMTP_PORT must be a whole number, "
                       "got 'smtp'; LOG_FORMAT must be json or text, got 'xml'")


def test_every_variable_empty_is_the_same_as_none_set():
    assert Settings.from_env({variable: "" for variable in VARIABLES}) == Settings.from_env({})


def test_only_the_exact_names_of_the_given_mapping_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("RESET_BATCH_SIZE", "7")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("RESET_BATCH_SIZE=8\n")
    assert Settings.from_env({"reset_batch_size": "9", "batch_size": "9"}).batch_size == 5000
    assert Settings.from_env().batch_size == 7, "the process environment, and no .env file"


def test_overrides_make_a_copy_of_known_attributes_only():
    base = Settings.from_env({})
    changed = base.with_overrides(smtp_port=2525, notify_backend="smtp")
    assert (changed.smtp_port, changed.notify_backend) == (2525, "smtp")
    assert (base.smtp_port, base.notify_backend) == (25, "console")
    with pytest.raises(TypeError, match="smtp_prot"):
        base.with_overrides(smtp_prot=2525)
    with pytest.raises(ValueError):
        base.smtp_port = 2525


def test_secrets_stay_out_of_the_printed_settings():
    shown = repr(Settings.from_env({"SMTP_PASSWORD": "pw-1", "NOTIFY_WEBHOOK_SECRET": "sec-2", "FLOWER_PASSWORD": "fl-3"}))
    assert "pw-1" not in shown and "sec-2" not in shown and "fl-3" not in shown


def test_settings_are_read_once_until_the_cache_is_reset(monkeypatch):
    monkeypatch.setenv("RESET_BATCH_SIZE", "11")
    reset_settings_cache()
    try:
        assert get_settings().batch_size == 11
        monkeypatch.setenv("RESET_BATCH_SIZE", "12")
        assert get_settings().batch_size == 11
        reset_settings_cache()
        assert get_settings().batch_size == 12
    finally:
        monkeypatch.undo()
        reset_settings_cache()


def test_use_env_reconfigures_settings_and_the_celery_app(use_env, tmp_path):
    from workers.app import app

    env = use_env(CELERY_BROKER_URL="redis://127.0.0.1:6379/9", RESET_BATCH_SIZE="17",
                  DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    assert env["RESET_BATCH_SIZE"] == "17"
    assert get_settings().batch_size == 17
    assert app.conf.broker_url == "redis://127.0.0.1:6379/9"
    assert app.conf.broker_transport_options == {"visibility_timeout": get_settings().visibility_timeout_seconds}
    use_env(CELERY_BROKER_URL=None)
    assert app.conf.broker_url == "filesystem://"


@pytest.mark.parametrize(("env", "exporters"), [
    ({}, ()),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ("otlp",)),
    ({"OTEL_TRACES_EXPORTER": "Console"}, ("console",)),
    ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ("otlp", "console")),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ()),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, ()),
])
def test_tracing_is_on_only_when_the_otel_variables_ask_for_it(env, exporters):
    assert Settings.from_env(env).tracing_exporters == exporters


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("OTEL_TRACES_EXPORTER", "jaeger", "OTEL_TRACES_EXPORTER must be otlp, console, both separated by a comma, "
                                       "or none; got 'jaeger'"),
    ("OTEL_TRACES_EXPORTER", "none,console", "OTEL_TRACES_EXPORTER must be otlp, console"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf, got 'grpc'"),
    ("OTEL_SDK_DISABLED", "maybe", "OTEL_SDK_DISABLED must be true or false"),
])
def test_malformed_tracing_variables_name_themselves(variable, value, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value).startswith(message)


def test_tests_run_with_a_private_data_dir():
    assert get_settings().data_dir != Path("data").resolve()


def test_every_variable_is_documented_in_the_readme():
    """Adding a setting means documenting it: every variable Settings reads is in README.md."""
    variables = set(VARIABLES)
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "RESET_BATCH_SIZE"} <= variables
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = sorted(v for v in variables if f"`{v}`" not in readme)
    assert not missing, f"README.md does not document {', '.join(missing)}"


def test_use_env_can_switch_the_broker_away_and_back(use_env, redis_url):
    """Publishing still works after the broker URL changed and came back (pools are rebuilt)."""
    import redis

    from models.messaging import send_now

    client = redis.Redis.from_url(redis_url)
    try:
        for _ in range(2):
            use_env(CELERY_BROKER_URL=redis_url)
            assert send_now("maintenance.sweep")
            use_env(CELERY_BROKER_URL=None)
        assert client.llen("maintenance") == 2
    finally:
        client.delete("maintenance")
        client.close()


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_a_renamed_variable_is_still_read_under_its_old_name_with_a_warning(old, new):
    value = "2.5" if "TIMEOUT" in new else "https://hooks.example.com/notify"
    attribute = VARIABLES[new]
    with pytest.warns(FutureWarning, match=f"{old} is deprecated.*set {new} instead"):
        settings = Settings.from_env({old: value})
    assert str(getattr(settings, attribute)) == value
    with pytest.warns(FutureWarning):
        both = Settings.from_env({old: "0.5" if "TIMEOUT" in new else "http://old", new: value})
    assert str(getattr(both, attribute)) == value, "the current name wins"
    if "TIMEOUT" in new:
        with pytest.raises(SettingsError, match=f"^{old} must be a number"):
            Settings.from_env({old: "soon"})
