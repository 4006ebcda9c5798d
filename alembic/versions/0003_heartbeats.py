"""heartbeats: who runs each branch and fan-in, since when (the database's clock), runs lost

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("jobs", "branches")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("runner", sa.String(length=200), nullable=True))
            batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
            batch.add_column(sa.Column("lost_runs", sa.Integer(), server_default="0", nullable=False))
    op.create_index(
        "ix_jobs_unfinished_heartbeat_at",
        "jobs",
        ["heartbeat_at"],
        postgresql_where=sa.text("state IN ('running', 'aggregating')"),
        sqlite_where=sa.text("state IN ('running', 'aggregating')"),
    )
    op.create_index(
        "ix_branches_running_heartbeat_at",
        "branches",
        ["heartbeat_at"],
        postgresql_where=sa.text("state = 'running'"),
        sqlite_where=sa.text("state = 'running'"),
    )
    op.create_index(
        "ix_chord_counters_unfired_claimed_at",
        "chord_counters",
        ["claimed_at"],
        postgresql_where=sa.text("NOT fired"),
        sqlite_where=sa.text("fired = 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_chord_counters_unfired_claimed_at", table_name="chord_counters")
    op.drop_index("ix_branches_running_heartbeat_at", table_name="branches")
    op.drop_index("ix_jobs_unfinished_heartbeat_at", table_name="jobs")
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lost_runs")
            batch.drop_column("heartbeat_at")
            batch.drop_column("runner")
