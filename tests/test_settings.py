"""The one settings object (models.settings.Settings.from_env)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.settings import Settings, SettingsError, get_settings, reset_settings_cache


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


def test_tests_run_with_a_private_data_dir():
    assert get_settings().data_dir != Path("data").resolve()


def test_every_variable_is_documented_in_the_readme():
    """Adding a setting means documenting it: every variable settings.py reads is in README.md."""
    import re

    import models.settings

    source = Path(models.settings.__file__).read_text()
    variables = set(re.findall(r"""env(?:\.get\(|, )["']([A-Z][A-Z0-9_]+)["']""", source))
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
