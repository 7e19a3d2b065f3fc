"""Segments, memberships, exclusions, user versions and the monthly-partitioned history.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Creates the history partition of one month if it is missing.  A row that arrives
# for a month without a partition lands in the default partition, and a partition
# for a month whose rows already sit there cannot be created: that month then stays
# in the default partition (reports read the parent table, so they are unaffected).
ENSURE_PARTITION = """
CREATE OR REPLACE FUNCTION ensure_history_partition(month date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', month)::date;
    name text := 'membership_history_' || to_char(first, 'YYYYMM');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN;
    END IF;
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I PARTITION OF membership_history '
        'FOR VALUES FROM (%L) TO (%L)',
        name, first::text || ' 00:00:00+00',
        (first + interval '1 month')::date::text || ' 00:00:00+00'
    );
EXCEPTION WHEN check_violation THEN
    RAISE NOTICE 'history for % stays in the default partition', first;
END $$;
"""


def upgrade() -> None:
    op.execute("CREATE SEQUENCE change_id_seq")
    op.create_table(
        "segments",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("slug", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("auto_bp", sa.Integer, nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.CheckConstraint("auto_bp BETWEEN 0 AND 10000", name="segments_auto_bp_range"),
    )
    op.create_index(
        "segments_live_slug",
        "segments",
        ["slug"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("segment_id", sa.BigInteger, sa.ForeignKey("segments.id"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("user_id", "segment_id", name="memberships_pkey"),
    )
    op.create_index("memberships_segment", "memberships", ["segment_id"])
    op.create_index(
        "memberships_expiry",
        "memberships",
        ["expires_at"],
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.create_table(
        "auto_exclusions",
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("segment_id", sa.BigInteger, sa.ForeignKey("segments.id"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("user_id", "segment_id", name="auto_exclusions_pkey"),
    )
    op.create_table(
        "user_versions",
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.execute(
        """
        CREATE TABLE membership_history (
            id bigint GENERATED ALWAYS AS IDENTITY,
            occurred_at timestamptz NOT NULL,
            user_id bigint NOT NULL,
            segment_id bigint NOT NULL,
            slug text NOT NULL,
            operation text NOT NULL,
            cause text NOT NULL,
            CONSTRAINT membership_history_pkey PRIMARY KEY (occurred_at, id),
            CONSTRAINT membership_history_operation CHECK (operation IN ('add', 'remove'))
        ) PARTITION BY RANGE (occurred_at)
        """
    )
    op.execute("CREATE TABLE membership_history_default PARTITION OF membership_history DEFAULT")
    op.execute("CREATE INDEX membership_history_user ON membership_history (user_id, occurred_at)")
    op.execute(ENSURE_PARTITION)
    # This month, the last one (expiry events are stamped in the past) and a year ahead.
    op.execute(
        """
        SELECT ensure_history_partition(
            (date_trunc('month', now()) + make_interval(months => m))::date
        )
        FROM generate_series(-1, 12) AS m
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE membership_history")
    op.execute("DROP FUNCTION ensure_history_partition(date)")
    op.drop_table("user_versions")
    op.drop_table("auto_exclusions")
    op.drop_table("memberships")
    op.drop_table("segments")
    op.execute("DROP SEQUENCE change_id_seq")
