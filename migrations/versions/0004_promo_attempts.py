"""Promo syncs as leased attempts: states, slot reservations, CP clean-up, count mirror.

A sync no longer holds a database connection while it talks to CP: it claims the promo
(a lease with a fencing token) and reserves its customers' slots in one short
transaction, talks to CP, then completes or fails in another.  What a failed or
abandoned attempt left in CP is listed in ``cp_cleanup`` until deleted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_UP = [
    "ALTER TABLE promo_syncs DROP CONSTRAINT promo_syncs_status_check",
    "ALTER TABLE promo_syncs RENAME COLUMN status TO state",
    # A pending or failed sync of the old scheme was retried by the reconciler; it is
    # now undone instead (its CP segment, if any, is deleted below).
    "UPDATE promo_syncs SET state = CASE state WHEN 'done' THEN 'synced' ELSE 'failed' END",
    "ALTER TABLE promo_syncs ADD CONSTRAINT promo_syncs_state_check"
    " CHECK (state IN ('in_progress', 'synced', 'failed', 'cancelled'))",
    "ALTER TABLE promo_syncs ADD COLUMN attempt_token text",
    "ALTER TABLE promo_syncs ADD COLUMN lease_until timestamptz",
    "ALTER TABLE promo_syncs ADD COLUMN cp_external_id text",
    "UPDATE promo_syncs SET cp_external_id = 'mss-promo-' || promo_id WHERE state = 'synced'",
    "CREATE INDEX promo_syncs_leased ON promo_syncs (lease_until) WHERE state = 'in_progress'",
    # reserved: an attempt in flight holds the slot; active: the promo is synced;
    # leaving: an update is removing the customer from CP (still counted until done).
    "ALTER TABLE sync_ledger ADD COLUMN state text NOT NULL DEFAULT 'active'"
    " CHECK (state IN ('reserved', 'active', 'leaving'))",
    "CREATE INDEX sync_ledger_promo ON sync_ledger (promo_id)",
    # One row per customer ever counted: the row lock that serialises slot
    # reservations (the threshold holds under concurrency), and the version of the
    # customer's counts that the Redis mirror is compared with.
    """
    CREATE TABLE sync_customers (
        customer_id bigint PRIMARY KEY,
        version bigint NOT NULL DEFAULT 0
    )
    """,
    "INSERT INTO sync_customers (customer_id, version)"
    " SELECT DISTINCT customer_id, 1 FROM sync_ledger",
    # Customers whose counts changed and whose mirror is not yet confirmed in Redis.
    """
    CREATE TABLE counter_outbox (
        customer_id bigint PRIMARY KEY,
        version bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX counter_outbox_created ON counter_outbox (created_at)",
    "INSERT INTO counter_outbox (customer_id, version) SELECT customer_id, 1 FROM sync_customers",
    # CP segments to delete: left by a failed, abandoned or cancelled sync.
    """
    CREATE TABLE cp_cleanup (
        id bigserial PRIMARY KEY,
        promo_id text NOT NULL,
        external_id text NOT NULL,
        segment_id text,
        attempts int NOT NULL DEFAULT 0,
        last_error text,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (external_id)
    )
    """,
    "INSERT INTO cp_cleanup (promo_id, external_id, segment_id)"
    " SELECT promo_id, 'mss-promo-' || promo_id, cp_segment_id FROM promo_syncs"
    " WHERE state = 'failed'",
    "DROP TABLE promo_sync_members",
]

_DOWN = [
    """
    CREATE TABLE promo_sync_members (
        promo_id text NOT NULL REFERENCES promo_syncs (promo_id),
        customer_id bigint NOT NULL,
        PRIMARY KEY (promo_id, customer_id)
    )
    """,
    "DROP TABLE cp_cleanup, counter_outbox, sync_customers",
    "DROP INDEX sync_ledger_promo",
    "DELETE FROM sync_ledger WHERE state <> 'active'",
    "ALTER TABLE sync_ledger DROP COLUMN state",
    "DROP INDEX promo_syncs_leased",
    "ALTER TABLE promo_syncs DROP COLUMN cp_external_id, DROP COLUMN lease_until,"
    " DROP COLUMN attempt_token",
    "ALTER TABLE promo_syncs DROP CONSTRAINT promo_syncs_state_check",
    "UPDATE promo_syncs SET state = CASE state WHEN 'synced' THEN 'done' ELSE 'failed' END",
    "ALTER TABLE promo_syncs RENAME COLUMN state TO status",
    "ALTER TABLE promo_syncs ADD CONSTRAINT promo_syncs_status_check"
    " CHECK (status IN ('pending', 'done', 'failed'))",
]


def upgrade() -> None:
    # asyncpg prepares each statement: run them one at a time.
    for statement in _UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in _DOWN:
        op.execute(statement)
