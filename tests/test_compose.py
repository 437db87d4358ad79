"""docker-compose.yml: no Docker engine runs here, so check what can be checked.

It parses, has the services, every command refers to an entry point that
exists in the project, and the start-up order is right.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ["migrate", "api", "worker-resets", "worker-batches", "worker-notifications", "worker-webhooks",
                "worker-maintenance", "beat", "flower"]
WORKERS = {"worker-resets": "resets", "worker-batches": "reset_batches",
           "worker-notifications": "notifications", "worker-webhooks": "webhooks",
           "worker-maintenance": "maintenance"}
# Profile `rabbitmq`: the same services on RabbitMQ (`docker compose --profile rabbitmq up`).
RABBITMQ_SERVICES = {f"{name}-rabbitmq": name for name in APP_SERVICES if name != "migrate"}


def argv_of(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def option(argv: list[str], name: str) -> str | None:
    for i, part in enumerate(argv):
        if part == name and i + 1 < len(argv):
            return argv[i + 1]
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def check_progress_reset(argv: list[str]) -> None:
    import click

    from producer.cli import parse, usage_error_line

    assert len(argv) >= 2, f"{argv}: no subcommand"
    # Every word must name a (sub-)command and the arguments must parse (no unknown options); nothing runs.
    try:
        parse(argv[1:])
    except click.UsageError as exc:
        raise AssertionError(f"'progress-reset {' '.join(argv[1:])}' does not parse: {usage_error_line(exc)}") from None


def check_celery(argv: list[str]) -> None:
    from models.queues import QUEUES

    assert argv[1:3] == ["-A", "workers"], f"{argv}: the Celery app is 'workers'"
    module = importlib.import_module("workers")
    assert hasattr(module, "app"), "the module 'workers' has no Celery app named 'app'"
    sub = argv[3]
    assert sub in {"worker", "beat", "flower", "inspect"}, f"unexpected celery subcommand {sub!r}"
    if sub == "flower":
        importlib.import_module("flower")
    if sub == "worker":
        queues = option(argv, "-Q")
        assert queues, f"{argv}: a worker service names its queues with -Q"
        unknown = set(queues.split(",")) - set(QUEUES)
        assert not unknown, f"queues {sorted(unknown)} are not in workers.config.QUEUES {QUEUES}"
        assert option(argv, "-n"), f"{argv}: name the node (-n queue@%h) so its health check can ping it"


def check_entry_point(argv: list[str]) -> None:
    if argv[0] == "progress-reset":
        check_progress_reset(argv)
    elif argv[0] == "celery":
        check_celery(argv)
    else:
        raise AssertionError(f"{argv[0]!r} is not an entry point of this project")


def test_compose_has_the_services():
    expected = {"postgres", "redis", *APP_SERVICES}
    assert expected <= SERVICES.keys(), f"missing services: {sorted(expected - SERVICES.keys())}"
    assert SERVICES["postgres"]["image"].startswith("postgres:16")
    assert SERVICES["redis"]["image"].startswith("redis:7")


def test_redis_keeps_messages():
    command = argv_of(SERVICES["redis"]["command"])
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--maxmemory-policy") == "noeviction"


OWNER_URL = "postgresql://postgres:postgres@postgres:5432/progress_reset"
APP_URL = "postgresql://progress_reset_app:${DATABASE_APP_PASSWORD:-progress_reset_app}@postgres:5432/progress_reset"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_app_service_runs_the_project_image_with_its_configuration(name):
    service = SERVICES[name]
    assert service["build"] == "." and (REPO_ROOT / "Dockerfile").exists()
    env = service["environment"]
    assert env["DATABASE_URL"] == (OWNER_URL if name == "migrate" else APP_URL)
    assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0"


def test_migrations_run_as_the_owner_and_grant_the_role_every_other_service_connects_as():
    from models.settings import Settings

    migrate = SERVICES["migrate"]["environment"]
    role = Settings.from_env({"DATABASE_APP_ROLE": migrate["DATABASE_APP_ROLE"]}).database_app_role
    assert APP_URL.startswith(f"postgresql://{role}:${{DATABASE_APP_PASSWORD")
    assert migrate["DATABASE_APP_PASSWORD"] == "${DATABASE_APP_PASSWORD:-progress_reset_app}"
    assert APP_URL.split("@")[0].endswith(":" + migrate["DATABASE_APP_PASSWORD"]), "one password for both"
    others = [name for name in [*APP_SERVICES, *RABBITMQ_SERVICES] if name != "migrate"]
    assert all("DATABASE_APP_ROLE" not in SERVICES[name]["environment"] for name in others)


@pytest.mark.parametrize("name", [*APP_SERVICES, *RABBITMQ_SERVICES])
def test_every_command_refers_to_an_existing_entry_point(name):
    check_entry_point(argv_of(SERVICES[name]["command"]))


@pytest.mark.parametrize("name", sorted(WORKERS) + sorted(f"{w}-rabbitmq" for w in WORKERS))
def test_each_worker_consumes_its_queue_and_is_health_checked(name):
    argv = argv_of(SERVICES[name]["command"])
    assert option(argv, "-Q") == WORKERS[name.removesuffix("-rabbitmq")]
    node = option(argv, "-n")
    health = SERVICES[name]["healthcheck"]["test"]
    check = health[1] if health[0] == "CMD-SHELL" else " ".join(health[1:])
    probe = shlex.split(check.replace("$$", "$"))
    assert probe[:5] == ["celery", "-A", "workers", "inspect", "ping"]
    assert option(probe, "-d") == node.replace("%h", "$HOSTNAME"), "the health check pings this container's node"


def test_batches_run_two_processes_and_resets_one():
    assert option(argv_of(SERVICES["worker-batches"]["command"]), "-c") == "2"
    assert option(argv_of(SERVICES["worker-resets"]["command"]), "-c") == "1"
    assert option(argv_of(SERVICES["worker-notifications"]["command"]), "-c") == "1"


def test_start_up_order():
    def condition(service: str, dependency: str) -> str | None:
        depends = SERVICES[service].get("depends_on") or {}
        if isinstance(depends, list):
            return "service_started" if dependency in depends else None
        return (depends.get(dependency) or {}).get("condition")

    assert condition("migrate", "postgres") == "service_healthy"
    for name in ["api", "beat", *WORKERS]:
        assert condition(name, "migrate") == "service_completed_successfully", name
        assert condition(name, "postgres") == "service_healthy", name
        assert condition(name, "redis") == "service_healthy", name
    assert condition("flower", "redis") == "service_healthy"
    assert SERVICES["migrate"].get("restart", "no") == "no", "the migration runs once"


def test_flower_takes_basic_auth_from_the_environment_and_listens_on_localhost():
    flower = SERVICES["flower"]
    assert {"FLOWER_USER", "FLOWER_PASSWORD"} <= flower["environment"].keys()
    assert re.fullmatch(r"\$\{FLOWER_PASSWORD(:-)?\}", flower["environment"]["FLOWER_PASSWORD"]), \
        "no default password: Flower refuses to start until one is set"
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"])
    conf = option(argv_of(flower["command"]), "--conf")
    assert conf is not None and (REPO_ROOT / conf).exists(), "Flower runs with the project's configuration file"


def test_health_checks_use_tools_the_images_have():
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "redis-cli" in " ".join(SERVICES["redis"]["healthcheck"]["test"])
    api_check = " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert re.search(r"/healthz", api_check)


def test_dockerfile_installs_the_locked_dependencies():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "requirements.lock" in dockerfile and re.search(r"pip install .*-c requirements\.lock \.", dockerfile)
    for package in ("models", "tasks", "workers", "producer"):
        assert f"COPY {package} " in dockerfile, f"the image lacks the {package} package"


# --- profile "observability": Prometheus, Grafana with the dashboard, Jaeger ------------------------

OBSERVABILITY = ("prometheus", "grafana", "jaeger")
DASHBOARD = REPO_ROOT / "docs" / "observability" / "progress-reset-dashboard.json"


def mounts(service: str) -> dict[str, str]:
    """``{path in the container: path in the repository}`` of a service's bind mounts."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = source[2:]
    return out


def test_the_observability_services_run_only_in_their_profile_with_pinned_images():
    for name in OBSERVABILITY:
        service = SERVICES[name]
        assert service.get("profiles") == ["observability"], name
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", f"{name}: pin the image version"
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", [])), name
    for name in APP_SERVICES:
        assert "profiles" not in SERVICES[name], f"{name} must run without any profile"


def test_app_services_send_traces_where_the_profile_receives_them():
    for name in APP_SERVICES:
        assert SERVICES[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    header = (REPO_ROOT / "docker-compose.yml").read_text()
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 docker compose --profile observability up" in header
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_prometheus_scrapes_the_api_metrics():
    config_path = mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((REPO_ROOT / config_path).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"api:{SERVICES['api']['environment']['HTTP_PORT']}"]
    assert option(argv_of(SERVICES["prometheus"]["command"]), "--config.file") == "/etc/prometheus/prometheus.yml"


def test_grafana_provisions_the_prometheus_source_and_the_dashboard():
    grafana = mounts("grafana")
    provisioning = REPO_ROOT / grafana["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text())["datasources"]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    dashboards = {target: source for target, source in grafana.items() if target.startswith(folder + "/")}
    assert list(dashboards.values()) == ["docs/observability/progress-reset-dashboard.json"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == prometheus["uid"] for p in panels)
    titles = " ".join(p["title"] for p in panels)
    for shown in ("Queue depth", "throughput", "Unit wait p95", "Notification lag", "Webhook delivery lag",
                  "Dead-lettered"):
        assert shown in titles, shown


# --- profile rabbitmq ------------------------------------------------------------------------------

def test_the_rabbitmq_profile_runs_rabbitmq_with_its_own_credentials_and_a_health_check():
    rabbitmq = SERVICES["rabbitmq"]
    assert rabbitmq["profiles"] == ["rabbitmq"]
    assert rabbitmq["image"].startswith("rabbitmq:3.13-management")
    env = rabbitmq["environment"]
    assert env["RABBITMQ_DEFAULT_VHOST"] == "progress_reset"
    assert env["RABBITMQ_DEFAULT_USER"].startswith("${RABBITMQ_USER") and env["RABBITMQ_DEFAULT_PASS"].startswith(
        "${RABBITMQ_PASSWORD")
    assert "rabbitmq-diagnostics" in rabbitmq["healthcheck"]["test"]
    assert any(str(v).endswith(":/var/lib/rabbitmq") for v in rabbitmq["volumes"]), "messages survive a restart"
    assert all(str(port).startswith("127.0.0.1:") for port in rabbitmq["ports"])


@pytest.mark.parametrize("name", sorted(RABBITMQ_SERVICES))
def test_the_rabbitmq_profile_runs_the_same_services_on_rabbitmq(name):
    """Each `<service>-rabbitmq` is its Redis twin (command, image, database) with RabbitMQ as the
    broker, Redis for the rate limit and health replies, and only in the profile."""
    service, twin = SERVICES[name], SERVICES[RABBITMQ_SERVICES[name]]
    assert service["profiles"] == ["rabbitmq"] and "profiles" not in twin
    assert service["build"] == twin["build"] and service["image"] == twin["image"]
    assert argv_of(service["command"]) == argv_of(twin["command"])
    env = service["environment"]
    assert env["DATABASE_URL"] == twin["environment"]["DATABASE_URL"]
    assert re.fullmatch(r"amqp://\$\{RABBITMQ_USER:-\w+\}:\$\{RABBITMQ_PASSWORD:-\w+\}@rabbitmq:5672/progress_reset",
                        env["CELERY_BROKER_URL"]), env["CELERY_BROKER_URL"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    if "migrate" in twin.get("depends_on", {}):
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    twin_ports = {str(p).split(":", 2)[2] for p in twin.get("ports", [])}
    ports = {str(p).split(":", 2)[2] for p in service.get("ports", [])}
    assert ports == twin_ports, "the same container ports"
    assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))


def test_both_stacks_can_run_at_once():
    """`--profile rabbitmq up` starts both stacks: no host port may be used twice."""
    published = [str(p).rsplit(":", 1)[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_flower_on_rabbitmq_reads_queue_lengths_from_the_management_api():
    env = SERVICES["flower-rabbitmq"]["environment"]
    assert env["FLOWER_BROKER_API"].endswith("@rabbitmq:15672/api/")
    assert re.fullmatch(r"\$\{FLOWER_PASSWORD(:-)?\}", env["FLOWER_PASSWORD"])
