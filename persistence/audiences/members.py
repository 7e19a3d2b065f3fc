"""An audience's member list in PostgreSQL: a replace writes a new generation by COPY
and switches the audience to it, a patch changes the current generation in place, each
change leaves one history row; and reading an audience."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from persistence.store import BULK_TIMEOUT_S, Conn, PgStore
from service.domain.audiences import AudienceChange, AudienceInfo, AudienceKey
from service.domain.pacing import Pacer

# Interpolated into SQL (hence the B608 exemptions): a constant, never input; values
# always go as $n parameters.  Bandit also warns "no failed test" on some of those
# f-strings: a known false alarm (PyCQA/bandit#1204), the exemption is still needed.
_INFO = "merchant_id, segment_type, customers, version, updated_at"


def _info(row: asyncpg.Record) -> AudienceInfo:
    return AudienceInfo(
        AudienceKey(row["merchant_id"], row["segment_type"]),
        row["customers"],
        row["version"],
        row["updated_at"],
    )


# Rows per COPY of a replace's members when the copy is paced.
PACED_COPY_ROWS = 50_000


class AudienceMembers:
    def __init__(self, store: PgStore, *, max_members_per_s: float = 0.0) -> None:
        # Shares the pool and error mapping of the main store.
        self._pg = store
        self._max_members_per_s = max_members_per_s

    async def _apply(self, conn: Conn, change: AudienceChange) -> AudienceInfo:
        """Apply a whole change now (never a part of a snapshot)."""
        if change.op == "replace":
            return await self._replace(conn, change.key, sorted(set(change.add)), change)
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
        # Bulk steps scale with the audience, so they
        # get their own timeout rather than the pool's per-statement one.  Paced, the
        # copy goes in slices with pauses (in the same transaction, so still atomic):
        # unpaced it takes a core of PostgreSQL for seconds, beside the API's.
        step = PACED_COPY_ROWS if self._max_members_per_s > 0 else max(1, len(ids))
        pace = Pacer(self._max_members_per_s)
        pace.start()
        for start in range(0, len(ids), step):
            await conn.copy_records_to_table(
                "audience_members",
                records=((generation, cid) for cid in ids[start : start + step]),
                columns=["generation", "customer_id"],
                timeout=BULK_TIMEOUT_S,
            )
            if start + step < len(ids):  # no wait after the last: the transaction holds locks
                await pace(step)
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

    async def get(self, key: AudienceKey) -> AudienceInfo | None:
        async with self._pg.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_INFO} FROM audiences"  # nosec B608
                " WHERE merchant_id = $1 AND segment_type = $2",
                key.merchant_id,
                key.segment_type,
            )
        return None if row is None or row["version"] == 0 else _info(row)
