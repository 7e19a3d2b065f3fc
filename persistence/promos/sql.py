"""What the promo store's parts share: SQL fragments, row mapping, the lock order."""

from __future__ import annotations

import math

import asyncpg

from persistence.store import PgStore
from service.domain.audiences import AudienceKey
from service.domain.promos import CustomerCounts, Promo, SyncInProgress

# Counted in sync-count (and mirrored): the promo is synced, or an update in flight is
# still removing the customer.  ``reserved`` only holds a slot against the threshold.
COUNTED = "('active', 'leaving')"

PROMO_COLUMNS = (
    "promo_id, merchant_id, segment_type, end_date, state, synced, skipped, cp_segment_id,"
    " cp_external_id, attempts, last_error, updated_at, attempt_token, audience_version,"
    " lease_until > now() AS leased,"
    " greatest(0, extract(epoch FROM lease_until - now()))::float8 AS lease_left"
)

# Lock (creating where missing) the customers' rows in id order, in one statement:
# inserting and locking in one ordered pass is what keeps two syncs of overlapping new
# customers from deadlocking (an insert waits for a concurrent insert of the same id).
# {ids} is a constant SELECT of customer_id, never input.
LOCK_CUSTOMERS = (
    "INSERT INTO sync_customers (customer_id) SELECT customer_id FROM ({ids}) s"
    " ORDER BY customer_id"
    " ON CONFLICT (customer_id) DO UPDATE SET version = sync_customers.version"
)

# A new version for customers whose counts changed, and an outbox row that stays until
# Redis is known to hold it.  The rows are locked already (LOCK_CUSTOMERS).
BUMP = """
    WITH b AS (
        UPDATE sync_customers SET version = version + 1
        WHERE customer_id = ANY($1::bigint[]) RETURNING customer_id, version)
    INSERT INTO counter_outbox (customer_id, version) SELECT customer_id, version FROM b
    ON CONFLICT (customer_id) DO UPDATE SET version = EXCLUDED.version, created_at = now()
"""


def promo_of(row: asyncpg.Record) -> Promo:
    return Promo(
        promo_id=row["promo_id"],
        key=AudienceKey(row["merchant_id"], row["segment_type"]),
        end_date=row["end_date"],
        state=row["state"],
        synced=row["synced"],
        skipped=row["skipped"],
        cp_segment_id=row["cp_segment_id"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        updated_at=row["updated_at"],
    )


def customer_counts(row: asyncpg.Record) -> CustomerCounts:
    return CustomerCounts(
        row["customer_id"], row["version"], dict(zip(row["promos"], row["ends"], strict=True))
    )


def row_count(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])


def in_progress(promo_id: str, lease_left: float) -> SyncInProgress:
    retry = max(1, math.ceil(lease_left))
    return SyncInProgress(
        f"another sync of promo {promo_id!r} is running; retry in {retry} s",
        {"promo_id": promo_id, "retry_after_s": retry},
    )


class PromoTables:
    """The base of the promo store's parts: they share the pool and error mapping of the
    main store."""

    def __init__(self, store: PgStore) -> None:
        self._pg = store
