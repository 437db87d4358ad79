"""The application role: what the API, workers and beat may do to each table, and the grants.

``progress-reset db upgrade`` runs the migrations as the tables' owner (``DATABASE_URL`` of
that command) and then, when ``DATABASE_APP_ROLE`` names a role, brings that role's grants to
exactly :data:`APP_PRIVILEGES` (PostgreSQL only: SQLite has no roles). The API, workers and
beat connect as that role, which owns nothing, so the audit trail's guard (migration 0005's
trigger) cannot be switched off by the code that writes the trail: ``ALTER TABLE ... DISABLE
TRIGGER`` and ``DROP TRIGGER`` need ownership, and the role holds only ``INSERT`` and
``SELECT`` on ``audit_events``.

Every table of the schema has an entry (a test checks it), so a new table is a decision, not
an accident. Applying the grants is safe to repeat: everything the role held on the schema's
tables and sequences is revoked and granted again in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from models.components import RESET_COMPONENTS
from models.errors import ProgressResetError
from models.settings import get_settings

READ = ("SELECT",)
# The progress rows a reset clears (R4): read and deleted, never written.
_CLEARED = {component.table.name: ("SELECT", "DELETE") for component in RESET_COMPONENTS}

APP_PRIVILEGES: dict[str, tuple[str, ...]] = {
    # The training platform's records: read for validation, summaries and notifications.
    "organizations": READ,
    "users": READ,
    "courses": READ,
    "course_items": READ,
    # A reset restarts the learner's attempt (row locks ride on UPDATE).
    "course_assignments": ("SELECT", "UPDATE"),
    **_CLEARED,
    "course_analytics": ("SELECT", "INSERT", "UPDATE"),
    # The ledger and the outboxes. DELETE: the retention sweep removes old rows of these.
    "reset_jobs": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "reset_batches": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "organization_turns": ("SELECT", "INSERT", "UPDATE"),
    "notifications": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    # Append-only: written and read, never changed (migration 0005).
    "audit_events": ("SELECT", "INSERT"),
    "retraining_campaigns": ("SELECT", "INSERT", "UPDATE"),
    "campaign_occurrences": ("SELECT", "INSERT", "UPDATE"),
    "api_keys": ("SELECT", "INSERT", "UPDATE"),
    "webhook_endpoints": ("SELECT", "INSERT", "UPDATE"),
    "webhook_events": ("SELECT", "INSERT", "DELETE"),
    "webhook_deliveries": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    # What retention removed: a job's pruned notification counts (gone with the job) and the
    # metrics' running totals (only ever added to).
    "pruned_notifications": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "retention_totals": ("SELECT", "INSERT", "UPDATE"),
    # The schema revision, compared with the code's by health checks and /readyz.
    "alembic_version": READ,
}
# What the role must never hold on the audit trail, whichever way it came by it.
AUDIT_FORBIDDEN = ("UPDATE", "DELETE", "TRUNCATE")
INSUFFICIENT_PRIVILEGE = "42501"


class AppRoleRefused(ProgressResetError):
    """The application role cannot be given least privilege as configured."""


@dataclass(frozen=True)
class AppRoleGrants:
    role: str
    created: bool
    tables: dict[str, tuple[str, ...]]


def grant_app_role(database_url: str | None = None, role: str | None = None,
                   password: str | None = None) -> AppRoleGrants | None:
    """Create ``role`` when missing and grant it exactly :data:`APP_PRIVILEGES`; safe to run again.

    Defaults come from the settings (``DATABASE_URL``, ``DATABASE_APP_ROLE``,
    ``DATABASE_APP_PASSWORD``). Returns None when no role is configured or the database is
    SQLite. Raises :class:`AppRoleRefused` (nothing changed) when the role is the one this
    connects as, a superuser, owns or may act as the owner of a table, or could still change
    the audit trail after the grants.
    """
    from models.db import make_engine

    settings = get_settings()
    url = database_url or settings.database_url
    role = settings.database_app_role if role is None else role
    password = settings.database_app_password if password is None else password
    if not role or not url.startswith("postgresql"):
        return None
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            created = _ensure_role(conn, role, password)
            tables = _grant(conn, role)
            _check_audit_guard(conn, role)
    finally:
        engine.dispose()
    return AppRoleGrants(role, created, tables)


def _quoted(conn: Connection, template: str, role: str, password: str = "") -> str:
    """DDL with the role as an identifier and the password as a literal (DDL takes no parameters)."""
    from psycopg import sql

    statement = sql.SQL(template).format(role=sql.Identifier(role), password=sql.Literal(password))
    return statement.as_string(conn.connection.driver_connection)


def _ensure_role(conn: Connection, role: str, password: str) -> bool:
    me = conn.scalar(text("SELECT current_user"))
    if role == me:
        raise AppRoleRefused(f"DATABASE_APP_ROLE is {role}, the role db upgrade connects as (the tables' owner); "
                             f"the application must connect as another role, which owns nothing")
    found = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = :role"), {"role": role}).first()
    if found is not None and found.rolsuper:
        raise AppRoleRefused(f"DATABASE_APP_ROLE {role} is a superuser, which no grant can restrict; "
                             f"name a role without SUPERUSER")
    if found is not None and not password:
        return False  # an existing role keeps the password it has
    verb = "CREATE ROLE {role} LOGIN" if found is None else "ALTER ROLE {role}"
    statement = verb + (" PASSWORD {password}" if password else "")
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(_quoted(conn, statement, role, password))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != INSUFFICIENT_PRIVILEGE:
            raise
        what, action = ("does not exist", "create it") if found is None else ("exists", "set its password")
        raise AppRoleRefused(f"role {role} {what} and {me} may not {action} (it needs CREATEROLE); run once as "
                             f"an administrator: {verb.format(role=role)} PASSWORD '...'") from None
    return found is None


def _grant(conn: Connection, role: str) -> dict[str, tuple[str, ...]]:
    quoted = conn.dialect.identifier_preparer.quote(role)
    owned = conn.scalars(text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'S', 'v', 'm') "
        "AND pg_has_role(:role, c.relowner, 'MEMBER') ORDER BY c.relname"), {"role": role}).all()
    if owned:
        raise AppRoleRefused(f"DATABASE_APP_ROLE {role} owns, or may act as the owner of, {', '.join(owned[:5])}"
                             f"{' ...' if len(owned) > 5 else ''}: the application role must own nothing; name "
                             f"another role (the tables belong to the role db upgrade connects as)")
    existing = set(conn.scalars(text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')")).all())
    schema = conn.dialect.identifier_preparer.quote(conn.scalar(text("SELECT current_schema()")))
    conn.exec_driver_sql(f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {quoted}")
    conn.exec_driver_sql(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {quoted}")
    conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {quoted}")
    granted = {table: privileges for table, privileges in APP_PRIVILEGES.items() if table in existing}
    for table, privileges in granted.items():
        conn.exec_driver_sql(f"GRANT {', '.join(privileges)} ON TABLE {schema}.{table} TO {quoted}")
    # Ids of the rows the role inserts come from the tables' own sequences.
    sequences = conn.scalars(text(
        "SELECT DISTINCT s.relname FROM pg_class s JOIN pg_depend d ON d.classid = 'pg_class'::regclass "
        "AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') "
        "JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace n ON n.oid = s.relnamespace "
        "WHERE s.relkind = 'S' AND n.nspname = current_schema() AND t.relname = ANY(:tables) ORDER BY 1"),
        {"tables": [t for t, privileges in granted.items() if "INSERT" in privileges]}).all()
    for sequence in sequences:
        conn.exec_driver_sql(f"GRANT USAGE ON SEQUENCE {schema}.{sequence} TO {quoted}")
    return granted


def _check_audit_guard(conn: Connection, role: str) -> None:
    """After the grants: the role must not be able to change ``audit_events`` by any route
    (PUBLIC grants, membership of a role such as ``pg_write_all_data``)."""
    if conn.scalar(text("SELECT to_regclass('audit_events') IS NULL")):
        return
    held = [privilege for privilege in AUDIT_FORBIDDEN if conn.scalar(
        text("SELECT has_table_privilege(:role, 'audit_events', :privilege)"), {"role": role, "privilege": privilege})]
    if held:
        raise AppRoleRefused(f"DATABASE_APP_ROLE {role} could still {', '.join(held)} audit_events through PUBLIC "
                             f"or another role's grants; revoke those (or name another role)")
