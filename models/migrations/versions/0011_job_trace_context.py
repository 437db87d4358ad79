"""The job keeps its trace context: the W3C traceparent of the span that confirmed it, so every
unit, the finalize, the notification runs and the webhook deliveries of the job join its trace.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 09:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites no row and takes the lock only for an instant.
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceparent', sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.drop_column('traceparent')
