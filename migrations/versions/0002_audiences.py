"""Merchant audiences, Kafka ingestion positions, promo syncs and the sync ledger.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _run(script: str) -> None:
    # asyncpg prepares each statement: run them one at a time.
    for statement in script.split(";"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _run(
        """
        CREATE SEQUENCE audience_generation_seq;

        -- One row per audience: `generation` points at its current member rows, so a
        -- replace writes a whole new generation and switches the pointer atomically.
        CREATE TABLE audiences (
            merchant_id bigint NOT NULL,
            segment_type text NOT NULL,
            generation bigint NOT NULL,
            version bigint NOT NULL,
            customers bigint NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (merchant_id, segment_type)
        );

        CREATE TABLE audience_members (
            generation bigint NOT NULL,
            customer_id bigint NOT NULL,
            PRIMARY KEY (generation, customer_id)
        );

        -- One row per applied change (a 2,000,000-customer snapshot is one row here).
        CREATE TABLE audience_history (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            merchant_id bigint NOT NULL,
            segment_type text NOT NULL,
            version bigint NOT NULL,
            operation text NOT NULL CHECK (operation IN ('replace', 'add', 'remove', 'patch')),
            added bigint NOT NULL,
            removed bigint NOT NULL,
            customers bigint NOT NULL,
            source text NOT NULL,
            batch_id text,
            occurred_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX audience_history_key ON audience_history (merchant_id, segment_type, id);

        -- Parts of a multi-message `replace` snapshot, until the last one arrives.
        CREATE TABLE snapshot_parts (
            merchant_id bigint NOT NULL,
            segment_type text NOT NULL,
            batch_id text NOT NULL,
            part int NOT NULL,
            parts int NOT NULL,
            customer_ids bigint[] NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (merchant_id, segment_type, batch_id, part)
        );

        -- The next Kafka offset to apply per partition, committed in the same
        -- transaction as the changes it covers: the consumer seeks here on assignment.
        CREATE TABLE ingest_offsets (
            topic text NOT NULL,
            partition int NOT NULL,
            next_offset bigint NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, partition)
        );

        CREATE TABLE promo_syncs (
            promo_id text PRIMARY KEY,
            merchant_id bigint NOT NULL,
            segment_type text NOT NULL,
            end_date date NOT NULL,
            status text NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
            synced bigint NOT NULL DEFAULT 0,
            skipped bigint NOT NULL DEFAULT 0,
            cp_segment_id text,
            audience_version bigint NOT NULL,
            attempts int NOT NULL DEFAULT 0,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        -- Who a promo is pushed to, fixed at its first attempt so that every retry
        -- sends CP exactly the same batches under the same idempotency keys.
        CREATE TABLE promo_sync_members (
            promo_id text NOT NULL REFERENCES promo_syncs (promo_id),
            customer_id bigint NOT NULL,
            PRIMARY KEY (promo_id, customer_id)
        );

        -- The durable ledger behind the per-customer counters: one row per customer and
        -- promo, counted while end_date has not passed.
        CREATE TABLE sync_ledger (
            customer_id bigint NOT NULL,
            promo_id text NOT NULL,
            end_date date NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (customer_id, promo_id)
        );
        CREATE INDEX sync_ledger_active ON sync_ledger (customer_id, end_date);
        """
    )


def downgrade() -> None:
    _run(
        """
        DROP TABLE sync_ledger, promo_sync_members, promo_syncs, ingest_offsets,
                   snapshot_parts, audience_history, audience_members, audiences;
        DROP SEQUENCE audience_generation_seq;
        """
    )
