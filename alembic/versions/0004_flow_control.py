"""flow control: admission of unfinished work, job priorities, redrives and their history

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("branches") as batch:
        batch.add_column(sa.Column("run", sa.Integer(), server_default="1", nullable=False))
    op.create_table(
        "job_history",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_history_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "run", name=op.f("pk_job_history")),
    )
    op.create_table(
        "branch_history",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_branch_history_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "index", "run", name=op.f("pk_branch_history")),
    )
    admission = op.create_table(
        "admission",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("active", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_admission")),
    )
    # Start from what is unfinished now: those jobs give their branches back when they end.
    unfinished = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT coalesce(sum(branch_total), 0) FROM jobs "
                "WHERE state IN ('pending', 'running', 'aggregating')"
            )
        )
        .scalar_one()
    )
    op.bulk_insert(admission, [{"name": "branches", "active": int(unfinished)}])


def downgrade() -> None:
    op.drop_table("admission")
    op.drop_table("branch_history")
    op.drop_table("job_history")
    with op.batch_alter_table("branches") as batch:
        batch.drop_column("run")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
        batch.drop_column("run")
