"""How an attempt ends (completed, failed, cancelled) and the CP clean-ups it leaves."""

from __future__ import annotations

import asyncpg

from persistence.promos.sql import (
    BUMP,
    LOCK_CUSTOMERS,
    PROMO_COLUMNS,
    PromoTables,
    in_progress,
    promo_of,
    row_count,
)
from persistence.store import BULK_TIMEOUT_S, Conn
from service.domain.promos import Cleanup, Promo, PromoNotFound


class PromoOutcomes(PromoTables):
    """Completing, failing and cancelling attempts; the CP clean-ups they leave."""

    async def _locked(self, conn: Conn, promo_id: str) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT {PROMO_COLUMNS} FROM promo_syncs WHERE promo_id = $1 FOR UPDATE",  # nosec B608
            promo_id,
        )

    async def record_segment(self, promo_id: str, token: str, segment_id: str) -> bool:
        async with self._pg.connection() as conn:
            status = await conn.execute(
                "UPDATE promo_syncs SET cp_segment_id = $3, updated_at = now()"
                " WHERE promo_id = $1 AND attempt_token = $2 AND state = 'in_progress'",
                promo_id,
                token,
                segment_id,
            )
        return row_count(status) == 1

    async def complete(self, promo_id: str, token: str) -> tuple[Promo, list[int]] | None:
        async with self._pg.transaction(bulk=True) as conn:
            row = await conn.fetchrow(
                "SELECT end_date FROM promo_syncs"
                " WHERE promo_id = $1 AND attempt_token = $2 AND state = 'in_progress'"
                " FOR UPDATE",
                promo_id,
                token,
            )
            if row is None:
                return None
            await self._lock_promo_customers(conn, promo_id)
            gone = await conn.fetch(
                "DELETE FROM sync_ledger WHERE promo_id = $1 AND state = 'leaving'"
                " RETURNING customer_id",
                promo_id,
            )
            moved = await conn.fetch(
                "UPDATE sync_ledger SET state = 'active', end_date = $2"
                " WHERE promo_id = $1 AND (state = 'reserved' OR end_date <> $2)"
                " RETURNING customer_id",
                promo_id,
                row["end_date"],
                timeout=BULK_TIMEOUT_S,
            )
            changed = sorted({r[0] for r in gone} | {r[0] for r in moved})
            await conn.execute(BUMP, changed, timeout=BULK_TIMEOUT_S)
            done = await conn.fetchrow(
                "UPDATE promo_syncs SET state = 'synced', attempt_token = NULL,"
                " lease_until = NULL, last_error = NULL, updated_at = now()"
                f" WHERE promo_id = $1 RETURNING {PROMO_COLUMNS}",  # nosec B608
                promo_id,
            )
            assert done is not None
        return promo_of(done), changed

    async def fail(
        self,
        promo_id: str,
        token: str,
        error: str,
        external_id: str | None,
        segment_id: str | None,
    ) -> tuple[list[Cleanup], list[int]]:
        async with self._pg.transaction(bulk=True) as conn:
            if external_id is not None:
                # Whatever happened to the promo meanwhile, this attempt's own segment
                # must not stay in CP.
                await self._add_cleanup(conn, promo_id, external_id, segment_id)
            row = await conn.fetchrow(
                f"SELECT {PROMO_COLUMNS} FROM promo_syncs"  # nosec B608
                " WHERE promo_id = $1 AND attempt_token = $2 AND state = 'in_progress'"
                " FOR UPDATE",
                promo_id,
                token,
            )
            changed = [] if row is None else await self._undo(conn, row, error)
            cleanups = await self._cleanups_of(conn, promo_id)
        return cleanups, changed

    async def _undo(self, conn: Conn, row: asyncpg.Record, error: str) -> list[int]:
        """Take an in-flight attempt out of force: every slot of the promo released, its
        CP segment listed for deletion, state ``failed``."""
        promo_id = row["promo_id"]
        if row["cp_external_id"] is not None:
            await self._add_cleanup(conn, promo_id, row["cp_external_id"], row["cp_segment_id"])
        changed = await self._release(conn, promo_id)
        await conn.execute(
            "UPDATE promo_syncs SET state = 'failed', synced = 0, cp_segment_id = NULL,"
            " cp_external_id = NULL, attempt_token = NULL, lease_until = NULL,"
            " last_error = $2, updated_at = now() WHERE promo_id = $1",
            promo_id,
            error[:1000],
        )
        return changed

    async def _release(self, conn: Conn, promo_id: str) -> list[int]:
        """Delete the promo's ledger rows; the customers whose counts changed."""
        await self._lock_promo_customers(conn, promo_id)
        rows = await conn.fetch(
            "DELETE FROM sync_ledger WHERE promo_id = $1 RETURNING customer_id, state",
            promo_id,
            timeout=BULK_TIMEOUT_S,
        )
        # A reservation was never counted in sync-count nor mirrored.
        changed = sorted(r[0] for r in rows if r[1] != "reserved")
        await conn.execute(BUMP, changed, timeout=BULK_TIMEOUT_S)
        return changed

    async def _lock_promo_customers(self, conn: Conn, promo_id: str) -> None:
        ids = "SELECT customer_id FROM sync_ledger WHERE promo_id = $1"
        await conn.execute(LOCK_CUSTOMERS.format(ids=ids), promo_id, timeout=BULK_TIMEOUT_S)

    async def _add_cleanup(
        self, conn: Conn, promo_id: str, external: str, segment_id: str | None
    ) -> None:
        await conn.execute(
            "INSERT INTO cp_cleanup (promo_id, external_id, segment_id) VALUES ($1, $2, $3)"
            " ON CONFLICT (external_id) DO UPDATE"
            " SET segment_id = coalesce(EXCLUDED.segment_id, cp_cleanup.segment_id)",
            promo_id,
            external,
            segment_id,
        )

    async def _cleanups_of(self, conn: Conn, promo_id: str) -> list[Cleanup]:
        rows = await conn.fetch(
            "SELECT id, promo_id, external_id, segment_id FROM cp_cleanup"
            " WHERE promo_id = $1 ORDER BY id",
            promo_id,
        )
        return [Cleanup(r[0], r[1], r[2], r[3]) for r in rows]

    async def cancel(self, promo_id: str) -> tuple[list[Cleanup], list[int]]:
        async with self._pg.transaction(bulk=True) as conn:
            row = await self._locked(conn, promo_id)
            if row is None:
                raise PromoNotFound(f"no promo {promo_id!r}", {"promo_id": promo_id})
            if row["state"] == "cancelled":
                return await self._cleanups_of(conn, promo_id), []
            if row["state"] == "in_progress" and row["leased"]:
                raise in_progress(promo_id, row["lease_left"])
            if row["cp_external_id"] is not None:
                await self._add_cleanup(conn, promo_id, row["cp_external_id"], row["cp_segment_id"])
            changed = await self._release(conn, promo_id)
            await conn.execute(
                "UPDATE promo_syncs SET state = 'cancelled', attempt_token = NULL,"
                " lease_until = NULL, updated_at = now() WHERE promo_id = $1",
                promo_id,
            )
            return await self._cleanups_of(conn, promo_id), changed

    async def get(self, promo_id: str) -> Promo | None:
        async with self._pg.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {PROMO_COLUMNS} FROM promo_syncs WHERE promo_id = $1",  # nosec B608
                promo_id,
            )
        return None if row is None else promo_of(row)

    # -- the reconciler's part ------------------------------------------------------

    async def expired_attempts(self, limit: int) -> list[tuple[str, str]]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(
                "SELECT promo_id, attempt_token FROM promo_syncs"
                " WHERE state = 'in_progress' AND lease_until < now()"
                " ORDER BY lease_until LIMIT $1",
                limit,
            )
        return [(r[0], r[1]) for r in rows]

    async def pending_cleanups(self, limit: int) -> list[Cleanup]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(
                "SELECT id, promo_id, external_id, segment_id FROM cp_cleanup"
                " ORDER BY attempts, id LIMIT $1",
                limit,
            )
        return [Cleanup(r[0], r[1], r[2], r[3]) for r in rows]

    async def cleanup_done(self, cleanup_id: int) -> None:
        async with self._pg.connection() as conn:
            await conn.execute("DELETE FROM cp_cleanup WHERE id = $1", cleanup_id)

    async def cleanup_failed(self, cleanup_id: int, error: str) -> None:
        async with self._pg.connection() as conn:
            await conn.execute(
                "UPDATE cp_cleanup SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                cleanup_id,
                error[:1000],
            )
