"""Indexes for listing an organization's jobs newest first (GET /v1/resets, jobs list).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 04:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_LEARNER = sa.text("learner_id IS NOT NULL")
_CAMPAIGN = sa.text("campaign_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_reset_jobs_org_created', ['organization_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_reset_jobs_org_state_created', ['organization_id', 'state', 'created_at', 'id'],
                              unique=False)
        batch_op.create_index('ix_reset_jobs_course_created', ['course_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_reset_jobs_learner_created', ['learner_id', 'created_at', 'id'], unique=False,
                              postgresql_where=_LEARNER, sqlite_where=_LEARNER)
        batch_op.create_index('ix_reset_jobs_campaign_created', ['campaign_id', 'created_at', 'id'], unique=False,
                              postgresql_where=_CAMPAIGN, sqlite_where=_CAMPAIGN)


def downgrade() -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        for name in ('ix_reset_jobs_campaign_created', 'ix_reset_jobs_learner_created', 'ix_reset_jobs_course_created',
                     'ix_reset_jobs_org_state_created', 'ix_reset_jobs_org_created'):
            batch_op.drop_index(name)
