"""eval suites and reports

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_text = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "evalsuite",
        sa.Column("id", _text(), nullable=False),
        sa.Column("agent_id", _text(), nullable=False),
        sa.Column("name", _text(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=True),
        sa.Column("dataset_id", _text(), nullable=False),
        sa.Column("content_hash", _text(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"]),
        sa.ForeignKeyConstraint(["dataset_id"], ["dataset.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("agent_id", "content_hash"),
    )
    op.create_index("ix_evalsuite_agent_id", "evalsuite", ["agent_id"])
    op.create_table(
        "evalreport",
        sa.Column("id", _text(), nullable=False),
        sa.Column("agent_id", _text(), nullable=False),
        sa.Column("job_id", _text(), nullable=False),
        sa.Column("suite_id", _text(), nullable=False),
        sa.Column("model_ref", _text(), nullable=False),
        sa.Column("model_id", _text(), nullable=True),
        sa.Column("model_family", _text(), nullable=False),
        sa.Column("baseline_ref", _text(), nullable=True),
        sa.Column("baseline_report_id", _text(), nullable=True),
        sa.Column("verdict", _text(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("results_path", _text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.ForeignKeyConstraint(["suite_id"], ["evalsuite.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("agent_id", "job_id", "suite_id", "model_ref", "model_id", "model_family", "created_at"):
        op.create_index(f"ix_evalreport_{column}", "evalreport", [column])


def downgrade() -> None:
    op.drop_table("evalreport")
    op.drop_table("evalsuite")
