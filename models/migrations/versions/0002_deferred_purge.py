"""Deferred purge: id-ordered course indexes, purge batches and job watermarks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 02:08:29.323634
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('course_assignments', schema=None) as batch_op:
        batch_op.drop_index('ix_course_assignments_user')
        batch_op.create_index('ix_course_assignments_user_course', ['user_id', 'course_id'], unique=False)

    with op.batch_alter_table('assessment_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_assessment_results_course_user'))
        batch_op.create_index('ix_assessment_results_course_id', ['course_id', 'id'], unique=False)
        batch_op.create_index('ix_assessment_results_course_user_id', ['course_id', 'user_id', 'id'], unique=False)

    with op.batch_alter_table('assignment_submissions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_assignment_submissions_course_user'))
        batch_op.create_index('ix_assignment_submissions_course_id', ['course_id', 'id'], unique=False)
        batch_op.create_index('ix_assignment_submissions_course_user_id', ['course_id', 'user_id', 'id'], unique=False)

    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.create_index('ix_certificates_course_id', ['course_id', 'id'], unique=False)

    with op.batch_alter_table('course_completions', schema=None) as batch_op:
        batch_op.create_index('ix_course_completions_course_id', ['course_id', 'id'], unique=False)

    with op.batch_alter_table('discussion_posts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_discussion_posts_course_user'))
        batch_op.create_index('ix_discussion_posts_course_id', ['course_id', 'id'], unique=False)
        batch_op.create_index('ix_discussion_posts_course_user_id', ['course_id', 'user_id', 'id'], unique=False)

    with op.batch_alter_table('lesson_progress', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lesson_progress_course_user'))
        batch_op.create_index('ix_lesson_progress_course_id', ['course_id', 'id'], unique=False)
        batch_op.create_index('ix_lesson_progress_course_user_id', ['course_id', 'user_id', 'id'], unique=False)

    with op.batch_alter_table('reset_batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='learners'))
        batch_op.add_column(sa.Column('component', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('cursor_row_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('hi_row_id', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('watermarks', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('purge_total', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('purge_done', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('finalized_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('course_assignments', schema=None) as batch_op:
        batch_op.drop_index('ix_course_assignments_user_course')
        batch_op.create_index('ix_course_assignments_user', ['user_id'], unique=False)

    with op.batch_alter_table('reset_jobs', schema=None) as batch_op:
        batch_op.drop_column('finalized_at')
        batch_op.drop_column('purge_done')
        batch_op.drop_column('purge_total')
        batch_op.drop_column('watermarks')

    with op.batch_alter_table('reset_batches', schema=None) as batch_op:
        batch_op.drop_column('hi_row_id')
        batch_op.drop_column('cursor_row_id')
        batch_op.drop_column('component')
        batch_op.drop_column('kind')

    with op.batch_alter_table('lesson_progress', schema=None) as batch_op:
        batch_op.drop_index('ix_lesson_progress_course_user_id')
        batch_op.drop_index('ix_lesson_progress_course_id')
        batch_op.create_index(batch_op.f('ix_lesson_progress_course_user'), ['course_id', 'user_id'], unique=False)

    with op.batch_alter_table('discussion_posts', schema=None) as batch_op:
        batch_op.drop_index('ix_discussion_posts_course_user_id')
        batch_op.drop_index('ix_discussion_posts_course_id')
        batch_op.create_index(batch_op.f('ix_discussion_posts_course_user'), ['course_id', 'user_id'], unique=False)

    with op.batch_alter_table('course_completions', schema=None) as batch_op:
        batch_op.drop_index('ix_course_completions_course_id')

    with op.batch_alter_table('certificates', schema=None) as batch_op:
        batch_op.drop_index('ix_certificates_course_id')

    with op.batch_alter_table('assignment_submissions', schema=None) as batch_op:
        batch_op.drop_index('ix_assignment_submissions_course_user_id')
        batch_op.drop_index('ix_assignment_submissions_course_id')
        batch_op.create_index(batch_op.f('ix_assignment_submissions_course_user'), ['course_id', 'user_id'], unique=False)

    with op.batch_alter_table('assessment_results', schema=None) as batch_op:
        batch_op.drop_index('ix_assessment_results_course_user_id')
        batch_op.drop_index('ix_assessment_results_course_id')
        batch_op.create_index(batch_op.f('ix_assessment_results_course_user'), ['course_id', 'user_id'], unique=False)

