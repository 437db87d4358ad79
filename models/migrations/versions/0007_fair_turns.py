"""Fair turns: when each organization last had a unit of reset work claimed, and for which job;
which message claimed each batch and each notification; a cancelling job still holds its course.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 04:45:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


ACTIVE_BEFORE = "state IN ('queued', 'running')"
ACTIVE_AFTER = "state IN ('queued', 'running', 'cancelling')"


def _active_indexes(active: str) -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_reset_jobs_active_course')
        batch_op.drop_index('uq_reset_jobs_active_learner')
        batch_op.create_index('uq_reset_jobs_active_course', ['course_id'], unique=True,
                              postgresql_where=sa.text(f"scope = 'course' AND {active}"),
                              sqlite_where=sa.text(f"scope = 'course' AND {active}"))
        batch_op.create_index('uq_reset_jobs_active_learner', ['course_id', 'learner_id'], unique=True,
                              postgresql_where=sa.text(f"scope = 'learner' AND {active}"),
                              sqlite_where=sa.text(f"scope = 'learner' AND {active}"))


def upgrade() -> None:
    _active_indexes(ACTIVE_AFTER)
    op.create_table(
        'organization_turns',
        sa.Column('organization_id', sa.Integer(), nullable=False),
        sa.Column('turn_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('job_created_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('job_id', sa.Uuid(), nullable=True),
        sa.PrimaryKeyConstraint('organization_id'),
    )
    with op.batch_alter_table('reset_batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=64), nullable=True))
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=64), nullable=True))


def downgrade() -> None:
    _active_indexes(ACTIVE_BEFORE)
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_column('claimed_by')
    with op.batch_alter_table('reset_batches', schema=None) as batch_op:
        batch_op.drop_column('claimed_by')
    op.drop_table('organization_turns')
