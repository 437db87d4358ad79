"""Notifications sent in one chain per job, claims under a lease: when a job's next send is due,
and the rows being sent per job.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 18:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('notify_wake_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index('ix_notifications_sending_job', ['reset_job_id', 'claimed_at'], unique=False,
                              postgresql_where=sa.text("status = 'sending'"),
                              sqlite_where=sa.text("status = 'sending'"))


def downgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_sending_job', postgresql_where=sa.text("status = 'sending'"),
                            sqlite_where=sa.text("status = 'sending'"))
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.drop_column('notify_wake_at')
