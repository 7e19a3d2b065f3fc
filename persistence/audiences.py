"""Merchant audiences and Kafka positions in PostgreSQL (promo syncs: promos.py).

Bulk paths use COPY (asyncpg's binary ``copy_records_to_table``), never row-by-row
inserts: a replace writes a new generation of member rows and switches the audience's
pointer to it in the same transaction, so readers see the old list or the new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from persistence.store import Conn, PgStore
from service.domain.audiences import (
    AudienceChange,
    AudienceInfo,
    AudienceKey,
    StaleSnapshot,
)

# Interpolated into SQL (hence the B608 exemptions): a constant, never input; values
# always go as $n parameters.  Bandit also warns "no failed test" on some of those
# f-strings: a known false alarm (PyCQA/bandit#1204), the exemption is still needed.
_INFO = "merchant_id, segment_type, customers, version, updated_at"

BULK_TIMEOUT_S = 600.0


def _info(row: asyncpg.Record) -> AudienceInfo:
    return AudienceInfo(
        AudienceKey(row["merchant_id"], row["segment_type"]),
        row["customers"],
        row["version"],
        row["updated_at"],
    )


class PgAudienceStore:
    def __init__(self, store: PgStore) -> None:
        # Shares the pool and error mapping of the main store.
        self._pg = store

    # -- applying changes -----------------------------------------------------

    async def apply(self, change: AudienceChange) -> AudienceInfo | None:
        async with self._pg.transaction() as conn:
            return await self._apply(conn, change)

    async def apply_batch(
        self, topic: str, partition: int, changes: Sequence[tuple[int, AudienceChange | None]]
    ) -> int:
        if not changes:
            return 0
        async with self._pg.transaction() as conn:
            stored = await conn.fetchval(
                "SELECT next_offset FROM ingest_offsets"
                " WHERE topic = $1 AND partition = $2 FOR UPDATE",
                topic,
                partition,
            )
            start = -1 if stored is None else stored
            applied = 0
            for offset, change in changes:
                if offset < start:
                    continue  # a re-delivery of what this partition already applied
                if change is not None:
                    await self._apply(conn, change)
                    applied += 1
            await conn.execute(
                "INSERT INTO ingest_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)"
                " ON CONFLICT (topic, partition) DO UPDATE"
                " SET next_offset = greatest(ingest_offsets.next_offset, EXCLUDED.next_offset),"
                " updated_at = now()",
                topic,
                partition,
                changes[-1][0] + 1,
            )
        return applied

    async def next_offsets(self, topic: str) -> dict[int, int]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(
                "SELECT partition, next_offset FROM ingest_offsets WHERE topic = $1", topic
            )
        return {r["partition"]: r["next_offset"] for r in rows}

    async def _apply(self, conn: Conn, change: AudienceChange) -> AudienceInfo | None:
        key = change.key
        if change.is_partial:
            ids = await self._stage(conn, change)
            if ids is None:
                return None
            return await self._replace(conn, key, ids, change)
        if change.op == "replace":
            return await self._replace(conn, key, sorted(set(change.add)), change)
        return await self._patch(conn, change)

    async def _lock(self, conn: Conn, key: AudienceKey) -> asyncpg.Record:
        """Lock the audience row, creating an empty audience on first sight."""
        await conn.execute(
            "INSERT INTO audiences (merchant_id, segment_type, generation, version, customers,"
            " updated_at) VALUES ($1, $2, nextval('audience_generation_seq'), 0, 0, now())"
            " ON CONFLICT DO NOTHING",
            key.merchant_id,
            key.segment_type,
        )
        row = await conn.fetchrow(
            "SELECT generation, version, customers FROM audiences"
            " WHERE merchant_id = $1 AND segment_type = $2 FOR UPDATE",
            key.merchant_id,
            key.segment_type,
        )
        assert row is not None
        return row

    async def _replace(
        self, conn: Conn, key: AudienceKey, ids: Sequence[int], change: AudienceChange
    ) -> AudienceInfo:
        current = await self._lock(conn, key)
        generation = await conn.fetchval("SELECT nextval('audience_generation_seq')")
        # Bulk steps scale with the audience (2,000,000 ids: ~2 s each here), so they
        # get their own timeout rather than the pool's per-statement one.
        await conn.copy_records_to_table(
            "audience_members",
            records=((generation, cid) for cid in ids),
            columns=["generation", "customer_id"],
            timeout=BULK_TIMEOUT_S,
        )
        row = await conn.fetchrow(
            "UPDATE audiences SET generation = $3, version = version + 1, customers = $4,"
            " updated_at = now() WHERE merchant_id = $1 AND segment_type = $2"
            f" RETURNING {_INFO}",  # nosec B608
            key.merchant_id,
            key.segment_type,
            generation,
            len(ids),
        )
        await conn.execute(
            "DELETE FROM audience_members WHERE generation = $1",
            current["generation"],
            timeout=BULK_TIMEOUT_S,
        )
        assert row is not None
        await self._history(conn, row, "replace", len(ids), current["customers"], change)
        return _info(row)

    async def _patch(self, conn: Conn, change: AudienceChange) -> AudienceInfo:
        key = change.key
        current = await self._lock(conn, key)
        generation = current["generation"]
        added = removed = 0
        if change.add:
            result = await conn.execute(
                "INSERT INTO audience_members (generation, customer_id)"
                " SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING",
                generation,
                list(change.add),
            )
            added = int(result.rsplit(" ", 1)[1])
        if change.remove:
            result = await conn.execute(
                "DELETE FROM audience_members"
                " WHERE generation = $1 AND customer_id = ANY($2::bigint[])",
                generation,
                list(change.remove),
            )
            removed = int(result.rsplit(" ", 1)[1])
        row = await conn.fetchrow(
            "UPDATE audiences SET version = version + 1, customers = customers + $3 - $4,"
            " updated_at = now() WHERE merchant_id = $1 AND segment_type = $2"
            f" RETURNING {_INFO}",  # nosec B608
            key.merchant_id,
            key.segment_type,
            added,
            removed,
        )
        assert row is not None
        await self._history(conn, row, change.op, added, removed, change)
        return _info(row)

    async def _history(
        self,
        conn: Conn,
        row: asyncpg.Record,
        op: str,
        added: int,
        removed: int,
        change: AudienceChange,
    ) -> None:
        await conn.execute(
            "INSERT INTO audience_history (merchant_id, segment_type, version, operation,"
            " added, removed, customers, source, batch_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            row["merchant_id"],
            row["segment_type"],
            row["version"],
            op,
            added,
            removed,
            row["customers"],
            change.source,
            change.batch_id,
        )

    async def _stage(self, conn: Conn, change: AudienceChange) -> list[int] | None:
        """Keep one part of a snapshot; when all are in, return the whole list."""
        key = change.key
        await conn.execute(
            "INSERT INTO snapshot_parts (merchant_id, segment_type, batch_id, part, parts,"
            " customer_ids) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            key.merchant_id,
            key.segment_type,
            change.batch_id,
            change.part,
            change.parts,
            list(change.add),
        )
        have = await conn.fetchval(
            "SELECT count(*) FROM snapshot_parts"
            " WHERE merchant_id = $1 AND segment_type = $2 AND batch_id = $3",
            key.merchant_id,
            key.segment_type,
            change.batch_id,
        )
        if have < change.parts:
            return None
        rows = await conn.fetch(
            "DELETE FROM snapshot_parts"
            " WHERE merchant_id = $1 AND segment_type = $2 AND batch_id = $3"
            " RETURNING customer_ids",
            key.merchant_id,
            key.segment_type,
            change.batch_id,
        )
        ids: set[int] = set()
        for r in rows:
            ids.update(r["customer_ids"])
        return sorted(ids)

    async def discard_stale_parts(self, older_than_s: float) -> list[StaleSnapshot]:
        async with self._pg.transaction() as conn:
            rows = await conn.fetch(
                """
                WITH stale AS (
                    SELECT merchant_id, segment_type, batch_id FROM snapshot_parts
                    GROUP BY merchant_id, segment_type, batch_id
                    HAVING max(received_at) < now() - make_interval(secs => $1)
                ), gone AS (
                    DELETE FROM snapshot_parts p USING stale s
                    WHERE p.merchant_id = s.merchant_id AND p.segment_type = s.segment_type
                      AND p.batch_id = s.batch_id
                    RETURNING p.merchant_id, p.segment_type, p.batch_id, p.parts
                )
                SELECT merchant_id, segment_type, batch_id, count(*) AS received,
                       max(parts) AS parts
                FROM gone GROUP BY merchant_id, segment_type, batch_id
                """,
                older_than_s,
            )
        return [
            StaleSnapshot(
                AudienceKey(r["merchant_id"], r["segment_type"]),
                r["batch_id"],
                r["received"],
                r["parts"],
            )
            for r in rows
        ]

    async def get(self, key: AudienceKey) -> AudienceInfo | None:
        async with self._pg.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_INFO} FROM audiences"  # nosec B608
                " WHERE merchant_id = $1 AND segment_type = $2",
                key.merchant_id,
                key.segment_type,
            )
        return None if row is None or row["version"] == 0 else _info(row)
