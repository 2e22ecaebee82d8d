"""tune studies: trials linked to their study, trial reservations carved out of the study's

Revision ID: 0004
Revises: 0001
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0004'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('study_job_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('trial_number', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_job_study_job_id'), ['study_job_id'], unique=False)
    with op.batch_alter_table('reservation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('within_job_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('reservation', schema=None) as batch_op:
        batch_op.drop_column('within_job_id')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_study_job_id'))
        batch_op.drop_column('trial_number')
        batch_op.drop_column('study_job_id')
