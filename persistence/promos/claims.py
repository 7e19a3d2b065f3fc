"""Claiming a promo for an attempt: a fresh sync, or an update of a synced one, with
the entrants' slots reserved under the threshold."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from persistence.promos.outcomes import PromoOutcomes
from persistence.promos.sql import LOCK_CUSTOMERS, PROMO_COLUMNS, in_progress, promo_of
from persistence.store import BULK_TIMEOUT_S, Conn
from service.domain.audiences import AudienceEmpty, AudienceKey, AudienceNotFound
from service.domain.promos import (
    Attempt,
    Claim,
    PromoCancelled,
    PromoConflict,
    external_id,
)

# Audience members not yet in the promo ($1: the audience generation, $2: the promo).
_ENTRANTS = (
    "SELECT m.customer_id FROM audience_members m WHERE m.generation = $1"
    " AND NOT EXISTS (SELECT 1 FROM sync_ledger x"
    " WHERE x.customer_id = m.customer_id AND x.promo_id = $2)"
)
_LOCK_ENTRANTS = LOCK_CUSTOMERS.format(ids=_ENTRANTS)
# A slot for each entrant whose other slots (active or reserved, not ended) are under
# the threshold ($5).
_RESERVE = (
    "INSERT INTO sync_ledger (customer_id, promo_id, end_date, state)"  # nosec B608
    f" SELECT e.customer_id, $2, $3, 'reserved' FROM ({_ENTRANTS}) e"
    " WHERE (SELECT count(*) FROM sync_ledger l WHERE l.customer_id = e.customer_id"
    "        AND l.end_date >= $4 AND l.promo_id <> $2) < $5"
    " RETURNING customer_id"
)


@dataclass(frozen=True, slots=True)
class _Terms:
    """What a claim asks for, as ``claim`` was called."""

    end_date: dt.date
    threshold: int
    today: dt.date
    lease_s: float
    token: str


class PromoClaims(PromoOutcomes):
    """Starting an attempt (``claim``); an abandoned one before it is undone first."""

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
        terms = _Terms(end_date, threshold, today, lease_s, token)
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
                        raise in_progress(promo_id, row["lease_left"])
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
                    return Claim(done=promo_of(row))
                return await self._update(conn, row, audience, terms)
            if audience["customers"] == 0:
                raise AudienceEmpty(f"the audience {key} has no customers", {"audience": str(key)})
            return await self._fresh(conn, promo_id, audience, terms)

    async def _reserve(
        self,
        conn: Conn,
        promo_id: str,
        generation: int,
        terms: _Terms,
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
            terms.end_date,
            terms.today,
            terms.threshold,
            timeout=BULK_TIMEOUT_S,
        )
        return sorted(r[0] for r in rows)

    async def _fresh(
        self,
        conn: Conn,
        promo_id: str,
        audience: asyncpg.Record,
        terms: _Terms,
    ) -> Claim:
        added = await self._reserve(conn, promo_id, audience["generation"], terms)
        synced, skipped = len(added), audience["customers"] - len(added)
        if not added:
            # Nobody passed the threshold: nothing to create in CP.
            row = await conn.fetchrow(
                "UPDATE promo_syncs SET state = 'synced', end_date = $2, synced = 0,"
                " skipped = $3, cp_segment_id = NULL, cp_external_id = NULL,"
                " audience_version = $4, attempts = attempts + 1, last_error = NULL,"
                " attempt_token = NULL, lease_until = NULL, updated_at = now()"
                f" WHERE promo_id = $1 RETURNING {PROMO_COLUMNS}",  # nosec B608
                promo_id,
                terms.end_date,
                skipped,
                audience["version"],
            )
            assert row is not None
            return Claim(done=promo_of(row))
        row = await conn.fetchrow(
            "UPDATE promo_syncs SET state = 'in_progress', end_date = $2, synced = $3,"
            " skipped = $4, cp_segment_id = NULL,"
            " cp_external_id = 'mss-promo-' || promo_id || '-' || (attempts + 1),"
            " audience_version = $5, attempts = attempts + 1, last_error = NULL,"
            " attempt_token = $6, lease_until = now() + make_interval(secs => $7),"
            f" updated_at = now() WHERE promo_id = $1 RETURNING {PROMO_COLUMNS}",  # nosec B608
            promo_id,
            terms.end_date,
            synced,
            skipped,
            audience["version"],
            terms.token,
            terms.lease_s,
        )
        assert row is not None
        assert row["cp_external_id"] == external_id(promo_id, row["attempts"])
        return Claim(
            attempt=Attempt(
                promo_of(row), terms.token, row["cp_external_id"], None, set_expiry=True, add=added
            )
        )

    async def _update(
        self,
        conn: Conn,
        row: asyncpg.Record,
        audience: asyncpg.Record,
        terms: _Terms,
    ) -> Claim:
        """A synced promo called again: bring it in line with the audience and date."""
        promo_id = row["promo_id"]
        if row["cp_segment_id"] is None:
            # Nobody passed the threshold last time: there is no CP segment to update.
            await conn.execute("DELETE FROM sync_ledger WHERE promo_id = $1", promo_id)
            return await self._fresh(conn, promo_id, audience, terms)
        leaving = await conn.fetch(
            "UPDATE sync_ledger l SET state = 'leaving' WHERE l.promo_id = $1"
            " AND NOT EXISTS (SELECT 1 FROM audience_members m"
            " WHERE m.generation = $2 AND m.customer_id = l.customer_id)"
            " RETURNING l.customer_id",
            promo_id,
            audience["generation"],
            timeout=BULK_TIMEOUT_S,
        )
        added = await self._reserve(conn, promo_id, audience["generation"], terms)
        removed = sorted(r[0] for r in leaving)
        members = await conn.fetchval(
            "SELECT count(*) FROM sync_ledger WHERE promo_id = $1 AND state <> 'leaving'",
            promo_id,
        )
        skipped = audience["customers"] - members
        if not added and not removed and terms.end_date == row["end_date"]:
            # The audience changed, but not who is pushed: no CP call.
            updated = await conn.fetchrow(
                "UPDATE promo_syncs SET audience_version = $2, skipped = $3,"
                f" updated_at = now() WHERE promo_id = $1 RETURNING {PROMO_COLUMNS}",  # nosec B608
                promo_id,
                audience["version"],
                skipped,
            )
            assert updated is not None
            return Claim(done=promo_of(updated))
        updated = await conn.fetchrow(
            "UPDATE promo_syncs SET state = 'in_progress', end_date = $2, synced = $3,"
            " skipped = $4, audience_version = $5, attempts = attempts + 1,"
            " last_error = NULL, attempt_token = $6,"
            " lease_until = now() + make_interval(secs => $7), updated_at = now()"
            f" WHERE promo_id = $1 RETURNING {PROMO_COLUMNS}",  # nosec B608
            promo_id,
            terms.end_date,
            members,
            skipped,
            audience["version"],
            terms.token,
            terms.lease_s,
        )
        assert updated is not None
        return Claim(
            attempt=Attempt(
                promo_of(updated),
                terms.token,
                row["cp_external_id"],
                row["cp_segment_id"],
                set_expiry=terms.end_date != row["end_date"],
                add=added,
                remove=removed,
            )
        )
