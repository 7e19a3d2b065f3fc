"""Promo syncs, slot reservations, the sync ledger and CP clean-ups in PostgreSQL.

Every method is one short transaction; none is open while CP is called.  Locks are
always taken in the same order, so concurrent syncs, completions and cancels of
overlapping audiences cannot deadlock: the promo's row first, then its customers'
``sync_customers`` rows in ascending id order.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator, Sequence

import asyncpg

from persistence.store import BULK_TIMEOUT_S, Conn, PgStore
from service.domain.audiences import AudienceEmpty, AudienceKey, AudienceNotFound
from service.domain.promos import (
    Attempt,
    Claim,
    Cleanup,
    CustomerCounts,
    Promo,
    PromoCancelled,
    PromoConflict,
    PromoNotFound,
    SyncInProgress,
    external_id,
)

# Counted in sync-count (and mirrored): the promo is synced, or an update in flight is
# still removing the customer.  ``reserved`` only holds a slot against the threshold.
_COUNTED = "('active', 'leaving')"

_PROMO = (
    "promo_id, merchant_id, segment_type, end_date, state, synced, skipped, cp_segment_id,"
    " cp_external_id, attempts, last_error, updated_at, attempt_token, audience_version,"
    " lease_until > now() AS leased,"
    " greatest(0, extract(epoch FROM lease_until - now()))::float8 AS lease_left"
)

# Lock (creating where missing) the customers' rows in id order, in one statement:
# inserting and locking in one ordered pass is what keeps two syncs of overlapping new
# customers from deadlocking (an insert waits for a concurrent insert of the same id).
# {ids} is a constant SELECT of customer_id, never input.
_LOCK_CUSTOMERS = (
    "INSERT INTO sync_customers (customer_id) SELECT customer_id FROM ({ids}) s"
    " ORDER BY customer_id"
    " ON CONFLICT (customer_id) DO UPDATE SET version = sync_customers.version"
)

# A new version for customers whose counts changed, and an outbox row that stays until
# Redis is known to hold it.  The rows are locked already (_LOCK_CUSTOMERS).
_BUMP = """
    WITH b AS (
        UPDATE sync_customers SET version = version + 1
        WHERE customer_id = ANY($1::bigint[]) RETURNING customer_id, version)
    INSERT INTO counter_outbox (customer_id, version) SELECT customer_id, version FROM b
    ON CONFLICT (customer_id) DO UPDATE SET version = EXCLUDED.version, created_at = now()
"""

# Audience members not yet in the promo ($1: the audience generation, $2: the promo).
_ENTRANTS = (
    "SELECT m.customer_id FROM audience_members m WHERE m.generation = $1"
    " AND NOT EXISTS (SELECT 1 FROM sync_ledger x"
    " WHERE x.customer_id = m.customer_id AND x.promo_id = $2)"
)
_LOCK_ENTRANTS = _LOCK_CUSTOMERS.format(ids=_ENTRANTS)
# A slot for each entrant whose other slots (active or reserved, not ended) are under
# the threshold ($5).
_RESERVE = (
    "INSERT INTO sync_ledger (customer_id, promo_id, end_date, state)"  # nosec B608
    f" SELECT e.customer_id, $2, $3, 'reserved' FROM ({_ENTRANTS}) e"
    " WHERE (SELECT count(*) FROM sync_ledger l WHERE l.customer_id = e.customer_id"
    "        AND l.end_date >= $4 AND l.promo_id <> $2) < $5"
    " RETURNING customer_id"
)

_COUNTS = f"""
    SELECT c.customer_id, c.version,
           array_remove(array_agg(l.promo_id), NULL) AS promos,
           array_remove(array_agg(l.end_date), NULL) AS ends
    FROM sync_customers c
    LEFT JOIN sync_ledger l ON l.customer_id = c.customer_id
        AND l.state IN {_COUNTED} AND l.end_date >= $2
    WHERE c.customer_id = ANY($1::bigint[])
    GROUP BY c.customer_id, c.version
"""  # nosec B608  # constants only


def _promo(row: asyncpg.Record) -> Promo:
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


def _counts(row: asyncpg.Record) -> CustomerCounts:
    return CustomerCounts(
        row["customer_id"], row["version"], dict(zip(row["promos"], row["ends"], strict=True))
    )


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])


class PgPromoStore:
    def __init__(self, store: PgStore) -> None:
        # Shares the pool and error mapping of the main store.
        self._pg = store

    # -- an attempt ---------------------------------------------------------------

    async def claim(
        self,
        promo_id: str,
        key: AudienceKey,
        end_date: dt.date,
        *,
        threshold: int,
        today: dt.date,
        lease_s: float,
        token: str,
    ) -> Claim:
        async with self._pg.transaction(bulk=True) as conn:
            # Create the promo's row first (it rolls back with any error below), so
            # that concurrent first calls queue on its lock instead of racing to insert.
            created = await conn.fetchval(
                "INSERT INTO promo_syncs (promo_id, merchant_id, segment_type, end_date,"
                " state, audience_version) VALUES ($1, $2, $3, $4, 'failed', 0)"
                " ON CONFLICT DO NOTHING RETURNING true",
                promo_id,
                key.merchant_id,
                key.segment_type,
                end_date,
            )
            row = await self._locked(conn, promo_id)
            assert row is not None
            if not created:
                if (row["merchant_id"], row["segment_type"]) != (
                    key.merchant_id,
                    key.segment_type,
                ):
                    raise PromoConflict(
                        f"promo {promo_id!r} was synced with another audience",
                        {"audience": f"{row['merchant_id']}:{row['segment_type']}"},
                    )
                if row["state"] == "cancelled":
                    raise PromoCancelled(
                        f"promo {promo_id!r} was cancelled", {"promo_id": promo_id}
                    )
                if row["state"] == "in_progress":
                    if row["leased"]:
                        raise _in_progress(promo_id, row["lease_left"])
                    # The attempt before crashed or stalled: undo it, then start anew.
                    await self._undo(conn, row, "abandoned: the attempt passed its deadline")
                    row = await self._locked(conn, promo_id)
                    assert row is not None
            audience = await conn.fetchrow(
                "SELECT generation, version, customers FROM audiences"
                " WHERE merchant_id = $1 AND segment_type = $2 FOR SHARE",
                key.merchant_id,
                key.segment_type,
            )
            if audience is None or audience["version"] == 0:
                raise AudienceNotFound(f"no audience for {key}", {"audience": str(key)})
            if row["state"] == "synced":
                if row["end_date"] == end_date and row["audience_version"] == audience["version"]:
                    return Claim(done=_promo(row))
                return await self._update(
                    conn, row, audience, end_date, threshold, today, lease_s, token
                )
            if audience["customers"] == 0:
                raise AudienceEmpty(f"the audience {key} has no customers", {"audience": str(key)})
            return await self._fresh(
                conn, promo_id, audience, end_date, threshold, today, lease_s, token
            )

    async def _locked(self, conn: Conn, promo_id: str) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT {_PROMO} FROM promo_syncs WHERE promo_id = $1 FOR UPDATE",  # nosec B608
            promo_id,
        )

    async def _reserve(
        self,
        conn: Conn,
        promo_id: str,
        generation: int,
        end_date: dt.date,
        threshold: int,
        today: dt.date,
    ) -> list[int]:
        """Reserve a slot for each audience member not yet in the promo whose active and
        reserved slots are under the threshold.  The customers' row locks make this a
        cap under any concurrency: the statement below starts after every other
        reservation of these customers has committed (or waits for it), and in READ
        COMMITTED each statement sees what committed before it started."""
        await conn.execute(_LOCK_ENTRANTS, generation, promo_id, timeout=BULK_TIMEOUT_S)
        rows = await conn.fetch(
            _RESERVE,
            generation,
            promo_id,
            end_date,
            today,
            threshold,
            timeout=BULK_TIMEOUT_S,
        )
        return sorted(r[0] for r in rows)

    async def _fresh(
        self,
        conn: Conn,
        promo_id: str,
        audience: asyncpg.Record,
        end_date: dt.date,
        threshold: int,
        today: dt.date,
        lease_s: float,
        token: str,
    ) -> Claim:
        added = await self._reserve(
            conn, promo_id, audience["generation"], end_date, threshold, today
        )
        synced, skipped = len(added), audience["customers"] - len(added)
        if not added:
            # Nobody passed the threshold: nothing to create in CP.
            row = await conn.fetchrow(
                "UPDATE promo_syncs SET state = 'synced', end_date = $2, synced = 0,"
                " skipped = $3, cp_segment_id = NULL, cp_external_id = NULL,"
                " audience_version = $4, attempts = attempts + 1, last_error = NULL,"
                " attempt_token = NULL, lease_until = NULL, updated_at = now()"
                f" WHERE promo_id = $1 RETURNING {_PROMO}",  # nosec B608
                promo_id,
                end_date,
                skipped,
                audience["version"],
            )
            assert row is not None
            return Claim(done=_promo(row))
        row = await conn.fetchrow(
            "UPDATE promo_syncs SET state = 'in_progress', end_date = $2, synced = $3,"
            " skipped = $4, cp_segment_id = NULL,"
            " cp_external_id = 'mss-promo-' || promo_id || '-' || (attempts + 1),"
            " audience_version = $5, attempts = attempts + 1, last_error = NULL,"
            " attempt_token = $6, lease_until = now() + make_interval(secs => $7),"
            f" updated_at = now() WHERE promo_id = $1 RETURNING {_PROMO}",  # nosec B608
            promo_id,
            end_date,
            synced,
            skipped,
            audience["version"],
            token,
            lease_s,
        )
        assert row is not None
        assert row["cp_external_id"] == external_id(promo_id, row["attempts"])
        return Claim(
            attempt=Attempt(
                _promo(row), token, row["cp_external_id"], None, set_expiry=True, add=added
            )
        )

    async def _update(
        self,
        conn: Conn,
        row: asyncpg.Record,
        audience: asyncpg.Record,
        end_date: dt.date,
        threshold: int,
        today: dt.date,
        lease_s: float,
        token: str,
    ) -> Claim:
        """A synced promo called again: bring it in line with the audience and date."""
        promo_id = row["promo_id"]
        if row["cp_segment_id"] is None:
            # Nobody passed the threshold last time: there is no CP segment to update.
            await conn.execute("DELETE FROM sync_ledger WHERE promo_id = $1", promo_id)
            return await self._fresh(
                conn, promo_id, audience, end_date, threshold, today, lease_s, token
            )
        leaving = await conn.fetch(
            "UPDATE sync_ledger l SET state = 'leaving' WHERE l.promo_id = $1"
            " AND NOT EXISTS (SELECT 1 FROM audience_members m"
            " WHERE m.generation = $2 AND m.customer_id = l.customer_id)"
            " RETURNING l.customer_id",
            promo_id,
            audience["generation"],
            timeout=BULK_TIMEOUT_S,
        )
        added = await self._reserve(
            conn, promo_id, audience["generation"], end_date, threshold, today
        )
        removed = sorted(r[0] for r in leaving)
        members = await conn.fetchval(
            "SELECT count(*) FROM sync_ledger WHERE promo_id = $1 AND state <> 'leaving'",
            promo_id,
        )
        skipped = audience["customers"] - members
        if not added and not removed and end_date == row["end_date"]:
            # The audience changed, but not who is pushed: no CP call.
            updated = await conn.fetchrow(
                "UPDATE promo_syncs SET audience_version = $2, skipped = $3,"
                f" updated_at = now() WHERE promo_id = $1 RETURNING {_PROMO}",  # nosec B608
                promo_id,
                audience["version"],
                skipped,
            )
            assert updated is not None
            return Claim(done=_promo(updated))
        updated = await conn.fetchrow(
            "UPDATE promo_syncs SET state = 'in_progress', end_date = $2, synced = $3,"
            " skipped = $4, audience_version = $5, attempts = attempts + 1,"
            " last_error = NULL, attempt_token = $6,"
            " lease_until = now() + make_interval(secs => $7), updated_at = now()"
            f" WHERE promo_id = $1 RETURNING {_PROMO}",  # nosec B608
            promo_id,
            end_date,
            members,
            skipped,
            audience["version"],
            token,
            lease_s,
        )
        assert updated is not None
        return Claim(
            attempt=Attempt(
                _promo(updated),
                token,
                row["cp_external_id"],
                row["cp_segment_id"],
                set_expiry=end_date != row["end_date"],
                add=added,
                remove=removed,
            )
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
        return _count(status) == 1

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
            await conn.execute(_BUMP, changed, timeout=BULK_TIMEOUT_S)
            done = await conn.fetchrow(
                "UPDATE promo_syncs SET state = 'synced', attempt_token = NULL,"
                " lease_until = NULL, last_error = NULL, updated_at = now()"
                f" WHERE promo_id = $1 RETURNING {_PROMO}",  # nosec B608
                promo_id,
            )
            assert done is not None
        return _promo(done), changed

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
                f"SELECT {_PROMO} FROM promo_syncs"  # nosec B608
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
        await conn.execute(_BUMP, changed, timeout=BULK_TIMEOUT_S)
        return changed

    async def _lock_promo_customers(self, conn: Conn, promo_id: str) -> None:
        ids = "SELECT customer_id FROM sync_ledger WHERE promo_id = $1"
        await conn.execute(_LOCK_CUSTOMERS.format(ids=ids), promo_id, timeout=BULK_TIMEOUT_S)

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
                raise _in_progress(promo_id, row["lease_left"])
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
                f"SELECT {_PROMO} FROM promo_syncs WHERE promo_id = $1",  # nosec B608
                promo_id,
            )
        return None if row is None else _promo(row)

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

    # -- counts ---------------------------------------------------------------------

    async def counts_of(self, customer_ids: Sequence[int], today: dt.date) -> list[CustomerCounts]:
        async with self._pg.connection() as conn:
            rows = await conn.fetch(_COUNTS, list(customer_ids), today)
        return [_counts(r) for r in rows]

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
                    f" AND end_date >= $2 AND state IN {_COUNTED}",  # nosec B608
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
                f"   AND l.state IN {_COUNTED})"  # nosec B608
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
                f" WHERE l.state IN {_COUNTED} AND l.end_date >= $1"  # nosec B608
                " GROUP BY c.customer_id, c.version",
                today,
            )
            while rows := await cursor.fetch(batch):
                yield [_counts(r) for r in rows]


def _in_progress(promo_id: str, lease_left: float) -> SyncInProgress:
    retry = max(1, math.ceil(lease_left))
    return SyncInProgress(
        f"another sync of promo {promo_id!r} is running; retry in {retry} s",
        {"promo_id": promo_id, "retry_after_s": retry},
    )
