"""dataset lineage: how a generated (synth) dataset was made

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 13:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lineage', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.drop_column('lineage')
