"""schedules, their runs, and the links of jobs to pipelines and schedules

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TEXT = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "schedule",
        sa.Column("id", _TEXT(), nullable=False),
        sa.Column("agent_id", _TEXT(), nullable=False),
        sa.Column("name", _TEXT(), nullable=False),
        sa.Column("kind", _TEXT(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("trigger", sa.JSON(), nullable=True),
        sa.Column("policies", sa.JSON(), nullable=True),
        sa.Column("budget_flops", sa.Float(), nullable=True),
        sa.Column("budget_window_seconds", sa.Float(), nullable=False),
        sa.Column("state", _TEXT(), nullable=False),
        sa.Column("state_reason", _TEXT(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("last_fire_at", sa.Float(), nullable=False),
        sa.Column("next_fire_at", sa.Float(), nullable=True),
        sa.Column("buffered_fire_at", sa.Float(), nullable=True),
        sa.Column("lease_owner", _TEXT(), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("agent_id", "name"),
    )
    op.create_index(op.f("ix_schedule_agent_id"), "schedule", ["agent_id"], unique=False)
    op.create_index(op.f("ix_schedule_state"), "schedule", ["state"], unique=False)
    op.create_index(op.f("ix_schedule_next_fire_at"), "schedule", ["next_fire_at"], unique=False)
    op.create_table(
        "schedulerun",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedule_id", _TEXT(), nullable=False),
        sa.Column("fire_time", sa.Float(), nullable=False),
        sa.Column("state", _TEXT(), nullable=False),
        sa.Column("job_id", _TEXT(), nullable=True),
        sa.Column("reason", _TEXT(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedule.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule_id", "fire_time"),
    )
    op.create_index(op.f("ix_schedulerun_schedule_id"), "schedulerun", ["schedule_id"], unique=False)
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pipeline_job_id", _TEXT(), nullable=True))
        batch_op.add_column(sa.Column("pipeline_step", _TEXT(), nullable=True))
        batch_op.add_column(sa.Column("schedule_id", _TEXT(), nullable=True))
        batch_op.create_index(batch_op.f("ix_job_pipeline_job_id"), ["pipeline_job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_job_schedule_id"), ["schedule_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_schedule_id"))
        batch_op.drop_index(batch_op.f("ix_job_pipeline_job_id"))
        batch_op.drop_column("schedule_id")
        batch_op.drop_column("pipeline_step")
        batch_op.drop_column("pipeline_job_id")
    op.drop_table("schedulerun")
    op.drop_table("schedule")
