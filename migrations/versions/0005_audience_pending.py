"""Audience changes applied in log order: a queue per audience behind a snapshot.

While a multi-part ``replace`` snapshot of an audience is being staged, the Kafka
changes of that audience that follow it in the log wait in ``audience_pending``, in
log order, and are applied on top of the snapshot when it completes (or on the list as
it was, when the incomplete snapshot is discarded).  The snapshot itself has a row
there too (``kind = 'snapshot'``, its parts stay in ``snapshot_parts``): its place in
the queue is the arrival of its first part.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_UP = [
    """
    CREATE TABLE audience_pending (
        merchant_id bigint NOT NULL,
        segment_type text NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        kind text NOT NULL CHECK (kind IN ('snapshot', 'replace', 'add', 'remove')),
        batch_id text,
        parts int,
        customer_ids bigint[],
        source text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (merchant_id, segment_type, seq)
    )
    """,
    "CREATE UNIQUE INDEX audience_pending_snapshot ON audience_pending"
    " (merchant_id, segment_type, batch_id) WHERE kind = 'snapshot'",
    # Snapshots being staged when this runs: queued in the order their parts came.
    "INSERT INTO audience_pending (merchant_id, segment_type, kind, batch_id, parts, source)"
    " SELECT merchant_id, segment_type, 'snapshot', batch_id, max(parts), 'kafka'"
    " FROM snapshot_parts GROUP BY merchant_id, segment_type, batch_id"
    " ORDER BY min(received_at)",
]

_DOWN = [
    # Changes still queued are lost with the table: apply or discard them first.
    "DROP TABLE audience_pending",
]


def upgrade() -> None:
    # asyncpg prepares each statement: run them one at a time.
    for statement in _UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in _DOWN:
        op.execute(statement)
