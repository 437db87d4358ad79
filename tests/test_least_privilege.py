"""Least privilege: migrations run as the tables' owner, the application as a role that owns nothing.

``progress-reset db upgrade`` (as the owner, with ``DATABASE_APP_ROLE``) creates the
application role and grants it exactly ``models.privileges.APP_PRIVILEGES``. As that role,
nothing can change the audit trail, not even by switching its guard off; and a reset still
runs end to end with the API, the workers and the CLI all connecting as it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from models.db import dispose_engine, make_engine, session_scope
from models.messaging import send_now
from models.privileges import APP_PRIVILEGES
from models.schema import Base
from models.seed import seed
from producer import apikeys
from tests.roles_support import drop_role, drop_stale_test_roles, process_role_name, url_as
from tests.test_cli_foundation import invoke
from tests.test_http_api import cli_argv, run_cli, start_api, wait_for_state  # noqa: F401 - fixture
from tests.webhook_support import Receiver

APP_PASSWORD = "app'password"  # a quote, so the literal in CREATE ROLE is proven escaped
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
AUDIT_CHANGES = {
    "update": "UPDATE audit_events SET reason = 'rewritten'",
    "delete": "DELETE FROM audit_events",
    "truncate": "TRUNCATE audit_events",
    "disable-trigger": "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
    "drop-trigger": "DROP TRIGGER audit_events_append_only ON audit_events",
}


@dataclass
class Roles:
    owner_url: str
    app_url: str
    role: str


@pytest.fixture(scope="module")
def app_role(admin_db_url):
    drop_stale_test_roles(admin_db_url)
    role = process_role_name("app")
    drop_role(admin_db_url, role)
    yield role
    drop_role(admin_db_url, role)


@pytest.fixture
def roles(fresh_db, app_role, use_env, redis_url) -> Roles:
    owner_url = fresh_db()
    use_env(DATABASE_URL=owner_url, DATABASE_APP_ROLE=app_role, DATABASE_APP_PASSWORD=APP_PASSWORD,
            CELERY_BROKER_URL=redis_url)
    upgraded = invoke("db", "upgrade", "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["app_role"] == app_role
    yield Roles(owner_url, url_as(owner_url, app_role, APP_PASSWORD), app_role)
    dispose_engine()


def scalar(url: str, statement: str, **params):
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.scalar(text(statement), params)
    finally:
        engine.dispose()


def held(url: str, role: str, table: str) -> set[str]:
    return {p for p in PRIVILEGES if scalar(url, "SELECT has_table_privilege(:r, :t, :p)", r=role, t=table, p=p)}


def app_connection(roles: Roles) -> psycopg.Connection:
    url = make_url(roles.app_url)
    return psycopg.connect(host=url.host, port=url.port, dbname=url.database, user=url.username,
                           password=url.password, autocommit=True)


def test_db_upgrade_grants_the_application_role_exactly_what_the_code_needs(roles):
    tables = set(Base.metadata.tables)
    assert tables | {"alembic_version"} == set(APP_PRIVILEGES), "every table needs an entry in APP_PRIVILEGES"
    for table in sorted(APP_PRIVILEGES):
        assert held(roles.owner_url, roles.role, table) == set(APP_PRIVILEGES[table]), table
    assert held(roles.owner_url, roles.role, "audit_events") == {"SELECT", "INSERT"}
    assert scalar(roles.owner_url, "SELECT count(*) FROM pg_class WHERE relowner = "
                                   "(SELECT oid FROM pg_roles WHERE rolname = :r)", r=roles.role) == 0
    assert scalar(roles.owner_url, "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles "
                                   "WHERE rolname = :r", r=roles.role) is False
    # Sequences only for the tables the role inserts into.
    assert scalar(roles.owner_url, "SELECT has_sequence_privilege(:r, 'audit_events_id_seq', 'USAGE')", r=roles.role)
    assert not scalar(roles.owner_url, "SELECT has_sequence_privilege(:r, 'users_id_seq', 'USAGE')", r=roles.role)
    # The password from DATABASE_APP_PASSWORD is the role's.
    assert scalar(roles.app_url, "SELECT current_user") == roles.role


def test_db_upgrade_again_takes_back_a_privilege_granted_by_hand(roles):
    engine = create_engine(roles.owner_url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"GRANT UPDATE, DELETE, TRUNCATE ON audit_events, users TO {roles.role}")
    engine.dispose()
    assert held(roles.owner_url, roles.role, "audit_events") >= {"UPDATE", "DELETE", "TRUNCATE"}
    again = invoke("db", "upgrade", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) | {"revision": None} == {"revision": None, "app_role": roles.role,
                                                             "app_role_created": False}
    assert held(roles.owner_url, roles.role, "audit_events") == {"SELECT", "INSERT"}
    assert held(roles.owner_url, roles.role, "users") == {"SELECT"}


@pytest.mark.parametrize("change", sorted(AUDIT_CHANGES))
def test_as_the_application_role_changing_the_audit_trail_is_refused(roles, change):
    with app_connection(roles) as conn:
        # The role writes and reads the trail: the refusal below is about the change, not the connection.
        conn.execute("INSERT INTO audit_events (action, organization_id, reason, origin, details, created_at) "
                     "VALUES ('test.event', 1, 'kept', 'test', '{}', now())")
        assert conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute(AUDIT_CHANGES[change])
        assert "permission denied" in str(refused.value) or "must be owner" in str(refused.value), refused.value
        # The field test's sequence: switch the guard off, then rewrite, in one transaction.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute(AUDIT_CHANGES["disable-trigger"])
            conn.execute(AUDIT_CHANGES["update"])
    assert scalar(roles.owner_url, "SELECT tgenabled FROM pg_trigger WHERE tgname = 'audit_events_append_only'") == "O"
    assert scalar(roles.owner_url, "SELECT count(*) FROM audit_events WHERE reason = 'kept'") == 1


def test_db_upgrade_refuses_a_role_that_could_bypass_the_guard(roles, admin_db_url):
    owner = process_role_name("owner")
    superuser = process_role_name("super")
    for role in (owner, superuser):
        drop_role(admin_db_url, role)
    engine = create_engine(roles.owner_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:  # the owner URL is the superuser's, in the test database
            conn.exec_driver_sql(f"CREATE ROLE {owner} LOGIN")
            conn.exec_driver_sql(f"CREATE ROLE {superuser} LOGIN SUPERUSER")
            conn.exec_driver_sql(f"ALTER TABLE api_keys OWNER TO {owner}")
        cases = {
            "postgres": "DATABASE_APP_ROLE is postgres, the role db upgrade connects as (the tables' owner)",
            owner: f"DATABASE_APP_ROLE {owner} owns, or may act as the owner of, api_keys",
            superuser: f"DATABASE_APP_ROLE {superuser} is a superuser, which no grant can restrict",
            "Bad-Name": "configuration: DATABASE_APP_ROLE must be a PostgreSQL role name",
        }
        for role, message in cases.items():
            refused = run_cli({**os.environ, "DATABASE_APP_ROLE": role}, "db", "upgrade")
            assert refused.returncode != 0, role
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (role, refused.stderr)
        # Nothing was granted to the refused roles.
        assert held(roles.owner_url, owner, "audit_events") == set()
    finally:
        engine.dispose()
        drop_role(admin_db_url, owner)
        drop_role(admin_db_url, superuser)


def test_db_upgrade_on_the_embedded_default_ignores_the_application_role(use_env, tmp_path, app_role):
    use_env(DATABASE_URL=f"sqlite:///{tmp_path / 'embedded.db'}", DATABASE_APP_ROLE=app_role)
    upgraded = invoke("db", "upgrade", "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["app_role"] is None


def _log_has_no_permission_error(name: str, log: str) -> None:
    assert "permission denied" not in log and "InsufficientPrivilege" not in log, f"{name}:\n{log[-4000:]}"


@pytest.mark.e2e
def test_a_reset_runs_end_to_end_with_every_process_connecting_as_the_application_role(
        roles, use_env, redis_url, tmp_path, start_api, celery_worker_proc):
    notifications = tmp_path / "notifications.jsonl"
    env = use_env(DATABASE_URL=roles.app_url, DATABASE_APP_ROLE=None, DATABASE_APP_PASSWORD=None,
                  CELERY_BROKER_URL=redis_url, REDIS_URL=redis_url, RESET_BATCH_SIZE="100",
                  RESET_PURGE_MIN_ROWS="0", NOTIFY_CONSOLE_PATH=str(notifications), NOTIFY_RATE_PER_SECOND="5000",
                  WEBHOOKS_ALLOW_HTTP_LOOPBACK="true", LOG_FORMAT="json")
    owner_engine = make_engine(roles.owner_url, poolclass=NullPool)
    with Session(owner_engine) as session, session.begin():  # the training platform's records
        org = seed(session, learners=400, lessons=6, courses=2, completed_ratio=0.4, random_seed=18)
    owner_engine.dispose()
    with session_scope() as session:  # from here on, everything connects as the application role
        key = apikeys.create_api_key(session, org.organization_id, "lms").key
    receiver = Receiver(secrets=[]).start()
    api = start_api(env)
    try:
        client = api.client(key)
        hook = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["reset.confirmed",
                                                                                    "reset.succeeded",
                                                                                    "reset.cancelled"]})
        assert hook.status_code == 201, hook.text
        receiver.secrets.append(hook.json()["secret"])
        course, other = org.course_ids
        jobs = {}
        for name, body in {"course": {"course_id": course}, "learner": {"course_id": other,
                                                                          "learner_id": org.learner_id}}.items():
            asked = client.post("/v1/resets", json={"actor_id": org.admin_id, "reason": "least privilege", **body})
            assert asked.status_code == 201, asked.text
            confirmed = client.post(f"/v1/resets/{asked.json()['request_id']}/confirm",
                                    json={"actor_id": org.admin_id, "token": asked.json()["token"]})
            assert confirmed.status_code == 202, confirmed.text
            jobs[name] = confirmed.json()["job_id"]
        cancelled = client.post(f"/v1/resets/{jobs['learner']}/cancel", json={"actor_id": org.admin_id})
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
        campaign = client.post("/v1/campaigns", json={"actor_id": org.admin_id, "course_id": other,
                                                      "cron": "0 6 1 * *", "reason": "yearly"})
        assert campaign.status_code == 201, campaign.text
        assert client.post(f"/v1/campaigns/{campaign.json()['campaign_id']}/confirm", json={
            "actor_id": org.admin_id, "token": campaign.json()["token"]}).status_code == 200

        worker = celery_worker_proc(env, concurrency=2, name="app-role")
        done = wait_for_state(client, jobs["course"], timeout=120)
        assert done["state"] == "succeeded" and done["learners_done"] == done["learners_total"] > 0, done
        deadline = time.monotonic() + 60
        while (status := client.get(f"/v1/resets/{jobs['course']}").json())["notifications"]["pending"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["notifications"]["sent"] > 0 and status["notifications"]["failed"] == 0, status
        assert len(notifications.read_text().splitlines()) == status["notifications"]["sent"]
        deadline = time.monotonic() + 30
        while {r.event_type for r in receiver.got()} != {"reset.confirmed", "reset.succeeded", "reset.cancelled"}:
            assert time.monotonic() < deadline, [r.event_type for r in receiver.got()]
            time.sleep(0.2)
        assert all(r.signature_ok for r in receiver.got())

        audit = client.get("/v1/audit", params={"limit": 200})
        assert audit.status_code == 200, audit.text
        actions = [event["action"] for event in audit.json()["items"]]
        for action in ("reset.requested", "reset.confirmed", "reset.cancelled",
                       "reset.succeeded", "campaign.confirmed", "webhook.created"):
            assert action in actions, (action, actions)
        # The sweep and the campaign dispatcher, the readiness probe, metrics, health and export.
        for task in ("maintenance.sweep", "campaigns.dispatch_due"):
            assert send_now(task, [])
            worker.wait_for_log(rf"Task {re.escape(task)}\[[^\]]+\] succeeded", timeout=30)
        assert client.get("/readyz").status_code == 200
        assert "progress_reset_database_up 1.0" in client.get("/metrics").text
        health = run_cli(env, "health", "--json", "--timeout", "20")
        assert health.returncode == 0, health.stdout + health.stderr
        export = run_cli(env, "audit", "export", "--organization", str(org.organization_id), "--from", "2000-01-01",
                         "--to", "2100-01-01")
        assert export.returncode == 0 and "reset.succeeded" in export.stdout, export.stderr
    finally:
        receiver.stop()
    _log_has_no_permission_error("worker", worker.log_text())
    _log_has_no_permission_error("api", api.log_text())
