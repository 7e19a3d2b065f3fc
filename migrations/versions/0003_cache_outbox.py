"""The cache outbox: one row per user change not yet confirmed in Redis.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Written in the same transaction as the change (its change id is the user's new
    # version); the reconciler deletes a row once Redis holds that version or newer.
    op.execute(
        """
        CREATE TABLE cache_outbox (
            change_id bigint PRIMARY KEY,
            user_id bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX cache_outbox_created ON cache_outbox (created_at)")


def downgrade() -> None:
    op.execute("DROP TABLE cache_outbox")
