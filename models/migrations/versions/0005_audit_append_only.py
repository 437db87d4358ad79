"""The audit trail is append-only in the database; an index to read it by organization and time.

On PostgreSQL, statement-level triggers refuse UPDATE, DELETE and TRUNCATE of
``audit_events`` (statement-level, so even a DELETE that matches no row is
refused). There is no retention job: removing old events is a deliberate
operator action (``ALTER TABLE audit_events DISABLE TRIGGER ...`` as the table
owner), documented in docs/operations.md. SQLite (the embedded demo) gets the
same refusal through RAISE(ABORT) triggers on UPDATE and DELETE.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 05:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_COURSE = sa.text("course_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_org_created', ['organization_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_audit_events_course_created', ['course_id', 'created_at', 'id'], unique=False,
                              postgresql_where=_COURSE, sqlite_where=_COURSE)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION audit_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_events is append-only: % is refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'the audit trail can be read and exported, never changed';
            END
            $$
        """)
        op.execute("CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change()")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                       f"BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: {verb} is refused'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_refuse_change()")
    else:
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS audit_events_no_{verb}")
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_course_created', postgresql_where=_COURSE, sqlite_where=_COURSE)
        batch_op.drop_index('ix_audit_events_org_created')
