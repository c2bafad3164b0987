"""shared state: values every replica agrees on (session secret, revoked sessions)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shared_state",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("shared_state") as batch:
        batch.create_index("ix_shared_state_expires_at", ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("shared_state") as batch:
        batch.drop_index("ix_shared_state_expires_at")
    op.drop_table("shared_state")
