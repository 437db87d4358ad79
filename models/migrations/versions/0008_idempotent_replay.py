"""Idempotent replay: reset requests keep a digest of their idempotency key, never the key, and the
confirmation token sealed under the key, so a replay answers with the same token.

Existing keys are replaced by their digest (the same HMAC-SHA256 the producer computes,
written out here so that this migration never changes with the code); requests made before
this revision have no sealed token, so their replay answers without one. The downgrade
cannot bring the raw keys back: they were never kept.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 12:00:00
"""
import hashlib
import hmac

from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

LOOKUP = b"progress-reset idempotency-key lookup"  # producer.idempotency.LOOKUP at this revision


def _index(column: str) -> dict:
    where = sa.text(f"{column} IS NOT NULL")
    return {"unique": True, "postgresql_where": where, "sqlite_where": where}


def upgrade() -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_key_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('sealed_token', sa.String(length=64), nullable=True))
    bind = op.get_bind()
    jobs = sa.table('reset_jobs', sa.column('id', sa.Uuid()), sa.column('idempotency_key', sa.String()),
                    sa.column('idempotency_key_hash', sa.String()))
    keyed = bind.execute(sa.select(jobs.c.id, jobs.c.idempotency_key)
                         .where(jobs.c.idempotency_key.is_not(None))).all()
    for job_id, key in keyed:
        digest = hmac.new(key.encode(), LOOKUP, hashlib.sha256).hexdigest()
        bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(idempotency_key_hash=digest))
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_reset_jobs_idempotency')
        batch_op.drop_column('idempotency_key')
        batch_op.create_index('uq_reset_jobs_idempotency', ['actor_id', 'idempotency_key_hash'],
                              **_index('idempotency_key_hash'))


def downgrade() -> None:
    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_reset_jobs_idempotency')
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=200), nullable=True))
        batch_op.drop_column('sealed_token')
        batch_op.drop_column('idempotency_key_hash')
        batch_op.create_index('uq_reset_jobs_idempotency', ['actor_id', 'idempotency_key'],
                              **_index('idempotency_key'))
