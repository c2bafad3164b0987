"""loops: runs of `flywheel loop` step by step; experiments get a mode (canary or shadow)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-23 23:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "loops",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("route", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("step", sa.String(length=32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("author_id", sa.String(length=200), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("loops") as batch:
        batch.create_index("ix_loops_project_status", ["project_id", "status"], unique=False)
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(
            sa.Column("mode", sa.String(length=16), nullable=False, server_default="canary")
        )


def downgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("mode")
    with op.batch_alter_table("loops") as batch:
        batch.drop_index("ix_loops_project_status")
    op.drop_table("loops")
