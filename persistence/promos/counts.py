"""The per-customer sync counts in the ledger, and the outbox of the Redis mirror."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence

from persistence.promos.sql import COUNTED, PromoTables, customer_counts
from service.domain.promos import CustomerCounts

_COUNTS = f"""
    SELECT c.customer_id, c.version,
           array_remove(array_agg(l.promo_id), NULL) AS promos,
           array_remove(array_agg(l.end_date), NULL) AS ends
    FROM sync_customers c
    LEFT JOIN sync_ledger l ON l.customer_id = c.customer_id
        AND l.state IN {COUNTED} AND l.end_date >= $2
    WHERE c.customer_id = ANY($1::bigint[])
    GROUP BY c.customer_id, c.version
"""  # nosec B608  # constants only


class PromoCounts(PromoTables):
    """The ledger's per-customer counts and the outbox of the Redis mirror."""

    async def counts_of(self, customer_ids: Sequence[int], today: dt.date) -> list[CustomerCounts]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(_COUNTS, list(customer_ids), today)
        return [customer_counts(r) for r in rows]

    async def confirm_mirrored(self, counts: Sequence[CustomerCounts]) -> None:
        async with self._pg.connection() as conn:
            await conn.execute(
                "DELETE FROM counter_outbox o USING unnest($1::bigint[], $2::bigint[])"
                " AS t(customer_id, version)"
                " WHERE o.customer_id = t.customer_id AND o.version <= t.version",
                [c.customer_id for c in counts],
                [c.version for c in counts],
            )

    async def counter_outbox(self, min_age_s: float, limit: int) -> list[int]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(
                "SELECT customer_id FROM counter_outbox"
                " WHERE created_at < now() - make_interval(secs => $1)"
                " ORDER BY customer_id LIMIT $2",
                min_age_s,
                limit,
            )
        return [r[0] for r in rows]

    async def active_sync_count(self, customer_id: int, today: dt.date) -> int:
        async with self._pg.connection() as conn:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM sync_ledger WHERE customer_id = $1"
                    f" AND end_date >= $2 AND state IN {COUNTED}",  # nosec B608
                    customer_id,
                    today,
                )
            )

    async def counter_versions(
        self, after_customer_id: int, limit: int, today: dt.date
    ) -> list[tuple[int, int, bool]]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(
                "SELECT c.customer_id, c.version, EXISTS (SELECT 1 FROM sync_ledger l"
                "   WHERE l.customer_id = c.customer_id AND l.end_date >= $3"
                f"   AND l.state IN {COUNTED})"  # nosec B608
                " FROM sync_customers c WHERE c.customer_id > $1"
                " ORDER BY c.customer_id LIMIT $2",
                after_customer_id,
                limit,
                today,
            )
        return [(r[0], r[1], r[2]) for r in rows]

    async def all_counts(self, today: dt.date, batch: int) -> AsyncIterator[list[CustomerCounts]]:
        async with self._pg.transaction(isolation="repeatable_read", readonly=True) as conn:
            cursor = await conn.cursor(
                "SELECT c.customer_id, c.version, array_agg(l.promo_id) AS promos,"
                " array_agg(l.end_date) AS ends"
                " FROM sync_ledger l JOIN sync_customers c USING (customer_id)"
                f" WHERE l.state IN {COUNTED} AND l.end_date >= $1"  # nosec B608
                " GROUP BY c.customer_id, c.version",
                today,
            )
            while rows := await cursor.fetch(batch):
                yield [customer_counts(r) for r in rows]
