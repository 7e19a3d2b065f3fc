"""Merchant audiences and Kafka positions in PostgreSQL (promo syncs: promos/).

Bulk paths use COPY (asyncpg's binary ``copy_records_to_table``), never row-by-row
inserts: a replace writes a new generation of member rows and switches the audience's
pointer to it in the same transaction, so readers see the old list or the new one.

Kafka changes apply in log order, per audience.  A multi-part ``replace`` (a snapshot)
takes its place in the log with its first part: from then on, until its last part is
in, every later Kafka change of that audience (``add``, ``remove``, a whole
``replace``, another snapshot) waits behind it in ``audience_pending``, in log order,
and is applied on top of the snapshot when the snapshot completes.  A snapshot whose
parts stop coming is discarded after ``SEGMENTS_SNAPSHOT_PART_TTL_S`` (counted from
its last part), and the changes that waited behind it are then applied, in order, to
the list as it was: the same result as if the snapshot had never been sent.  A part
of a snapshot that was already applied (a late duplicate of the same ``batch_id``) is
skipped.  Changes through the API are not in the log and apply at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from persistence.store import BULK_TIMEOUT_S, Conn, PgStore
from service.domain.audiences import (
    AudienceChange,
    AudienceInfo,
    AudienceKey,
    StaleSnapshot,
)
from service.domain.pacing import Pacer

# Interpolated into SQL (hence the B608 exemptions): a constant, never input; values
# always go as $n parameters.  Bandit also warns "no failed test" on some of those
# f-strings: a known false alarm (PyCQA/bandit#1204), the exemption is still needed.
_INFO = "merchant_id, segment_type, customers, version, updated_at"


# pg_advisory_xact_lock(AUDIENCE_QUEUE_LOCK, hashtext(key)): serialises the changes of
# one audience's queue (the consumer of its partition and any process's stale-snapshot
# clean-up).  The two-int form is a key space of its own (store.REGISTRY_LOCK is a bigint).
AUDIENCE_QUEUE_LOCK = 0x5E6_0002

# How far back a first part's batch_id is looked for among the audience's applied
# changes (a late duplicate of an applied snapshot's part is skipped).
DUPLICATE_LOOKBACK = 10_000

log = logging.getLogger(__name__)


def _info(row: asyncpg.Record) -> AudienceInfo:
    return AudienceInfo(
        AudienceKey(row["merchant_id"], row["segment_type"]),
        row["customers"],
        row["version"],
        row["updated_at"],
    )


# Rows per COPY of a replace's members when the copy is paced.
PACED_COPY_ROWS = 50_000


class PgAudienceStore:
    def __init__(self, store: PgStore, *, max_members_per_s: float = 0.0) -> None:
        # Shares the pool and error mapping of the main store.
        self._pg = store
        self._max_members_per_s = max_members_per_s

    # -- applying changes -----------------------------------------------------

    async def apply(self, change: AudienceChange) -> AudienceInfo | None:
        async with self._pg.transaction(bulk=True) as conn:
            if change.is_partial:
                await self._in_order(conn, change, await self._queued(conn))
                return None
            return await self._apply(conn, change)

    async def apply_batch(
        self, topic: str, partition: int, changes: Sequence[tuple[int, AudienceChange | None]]
    ) -> int:
        if not changes:
            return 0
        async with self._pg.transaction(bulk=True) as conn:
            stored = await conn.fetchval(
                "SELECT next_offset FROM ingest_offsets"
                " WHERE topic = $1 AND partition = $2 FOR UPDATE",
                topic,
                partition,
            )
            start = -1 if stored is None else stored
            # Audiences with changes waiting behind a snapshot.  Only this partition's
            # consumer adds to their queues (a key lives on one partition); a clean-up
            # may empty one meanwhile, which _in_order handles.
            queued = await self._queued(conn)
            applied = 0
            for offset, change in changes:
                if offset < start:
                    continue  # a re-delivery of what this partition already applied
                if change is not None:
                    await self._in_order(conn, change, queued)
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

    async def _apply(self, conn: Conn, change: AudienceChange) -> AudienceInfo:
        """Apply a whole change now (never a part of a snapshot)."""
        if change.op == "replace":
            return await self._replace(conn, change.key, sorted(set(change.add)), change)
        return await self._patch(conn, change)

    # -- log order: the queue of an audience behind a snapshot being staged -----

    async def _queued(self, conn: Conn) -> set[AudienceKey]:
        rows = await conn.fetch("SELECT DISTINCT merchant_id, segment_type FROM audience_pending")
        return {AudienceKey(r["merchant_id"], r["segment_type"]) for r in rows}

    async def _lock_queue(self, conn: Conn, key: AudienceKey) -> None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", AUDIENCE_QUEUE_LOCK, str(key)
        )

    async def _in_order(self, conn: Conn, change: AudienceChange, queued: set[AudienceKey]) -> None:
        """Apply a Kafka change in log order: at once when nothing of its audience is
        waiting, else behind what waits (``queued`` is kept up to date)."""
        key = change.key
        if key not in queued and not change.is_partial:
            await self._apply(conn, change)
            return
        await self._lock_queue(conn, key)
        if change.is_partial:
            await self._stage(conn, change)
        else:
            await conn.execute(
                "INSERT INTO audience_pending (merchant_id, segment_type, kind, batch_id,"
                " customer_ids, source) VALUES ($1, $2, $3, $4, $5, $6)",
                key.merchant_id,
                key.segment_type,
                change.op,
                change.batch_id,
                list(change.add if change.op != "remove" else change.remove),
                change.source,
            )
        _, empty = await self._drain(conn, key)
        if empty:
            queued.discard(key)
        else:
            queued.add(key)

    async def _stage(self, conn: Conn, change: AudienceChange) -> None:
        """Keep one part of a snapshot; its first part puts the snapshot in the queue."""
        key = change.key
        parts = await conn.fetchval(
            "SELECT parts FROM audience_pending WHERE merchant_id = $1 AND segment_type = $2"
            " AND kind = 'snapshot' AND batch_id = $3",
            key.merchant_id,
            key.segment_type,
            change.batch_id,
        )
        if parts is None:
            applied_before = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM (SELECT operation, batch_id FROM audience_history"
                " WHERE merchant_id = $1 AND segment_type = $2 ORDER BY id DESC LIMIT $4) h"
                " WHERE h.operation = 'replace' AND h.batch_id = $3)",
                key.merchant_id,
                key.segment_type,
                change.batch_id,
                DUPLICATE_LOOKBACK,
            )
            if applied_before:
                log.warning(
                    "part %d of snapshot %s of %s skipped: that snapshot was already applied",
                    change.part,
                    change.batch_id,
                    key,
                )
                return
            await conn.execute(
                "INSERT INTO audience_pending (merchant_id, segment_type, kind, batch_id, parts,"
                " source) VALUES ($1, $2, 'snapshot', $3, $4, $5)",
                key.merchant_id,
                key.segment_type,
                change.batch_id,
                change.parts,
                change.source,
            )
        elif parts != change.parts:
            log.warning(
                "part %d of snapshot %s of %s skipped: it says %d parts, the snapshot has %d",
                change.part,
                change.batch_id,
                key,
                change.parts,
                parts,
            )
            return
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

    async def _drain(self, conn: Conn, key: AudienceKey) -> tuple[int, bool]:
        """Apply the audience's queue from its head up to the first snapshot that is not
        complete.  Returns how many changes were applied and whether the queue is empty.
        The caller holds the queue's lock."""
        applied = 0
        while True:
            head = await conn.fetchrow(
                "SELECT seq, kind, batch_id, parts, customer_ids, source FROM audience_pending"
                " WHERE merchant_id = $1 AND segment_type = $2 ORDER BY seq LIMIT 1",
                key.merchant_id,
                key.segment_type,
            )
            if head is None:
                return applied, True
            if head["kind"] == "snapshot":
                ids = await self._take_snapshot(conn, key, head["batch_id"], head["parts"])
                if ids is None:
                    return applied, False
                change = AudienceChange(
                    key, "replace", add=ids, source=head["source"], batch_id=head["batch_id"]
                )
                await self._replace(conn, key, ids, change)
            else:
                ids = head["customer_ids"]
                kind = head["kind"]
                await self._apply(
                    conn,
                    AudienceChange(
                        key,
                        kind,
                        add=ids if kind != "remove" else (),
                        remove=ids if kind == "remove" else (),
                        source=head["source"],
                        batch_id=head["batch_id"],
                    ),
                )
            await conn.execute(
                "DELETE FROM audience_pending"
                " WHERE merchant_id = $1 AND segment_type = $2 AND seq = $3",
                key.merchant_id,
                key.segment_type,
                head["seq"],
            )
            applied += 1

    async def _take_snapshot(
        self, conn: Conn, key: AudienceKey, batch_id: str, parts: int
    ) -> list[int] | None:
        """The whole list of a snapshot whose parts are all in (its parts are removed),
        or None while parts are missing."""
        have = await conn.fetchval(
            "SELECT count(*) FROM snapshot_parts"
            " WHERE merchant_id = $1 AND segment_type = $2 AND batch_id = $3",
            key.merchant_id,
            key.segment_type,
            batch_id,
        )
        if have < parts:
            return None
        rows = await conn.fetch(
            "DELETE FROM snapshot_parts"
            " WHERE merchant_id = $1 AND segment_type = $2 AND batch_id = $3"
            " RETURNING customer_ids",
            key.merchant_id,
            key.segment_type,
            batch_id,
        )
        ids: set[int] = set()
        for r in rows:
            ids.update(r["customer_ids"])
        return sorted(ids)

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

    async def discard_stale_parts(self, older_than_s: float) -> list[StaleSnapshot]:
        """Discard the incomplete snapshots whose last part came more than
        ``older_than_s`` ago.  (A complete snapshot waiting behind an incomplete one is
        kept: it applies in its turn.)

        The changes that waited behind a discarded snapshot are applied then, in log
        order, to the list as it is (as if the snapshot had never been sent), up to the
        next snapshot still being staged.  One transaction per snapshot, under its
        audience's queue lock, so a part that arrives meanwhile is never lost.
        """
        async with self._pg.connection() as conn:
            candidates = await conn.fetch(
                "SELECT merchant_id, segment_type, batch_id FROM snapshot_parts"
                " GROUP BY merchant_id, segment_type, batch_id"
                " HAVING max(received_at) < now() - make_interval(secs => $1)"
                " AND count(*) < max(parts) ORDER BY min(received_at)",
                older_than_s,
            )
        stale: list[StaleSnapshot] = []
        for c in candidates:
            key = AudienceKey(c["merchant_id"], c["segment_type"])
            async with self._pg.transaction(bulk=True) as conn:
                await self._lock_queue(conn, key)
                gone = await conn.fetchrow(
                    """
                    WITH gone AS (
                        DELETE FROM snapshot_parts
                        WHERE merchant_id = $1 AND segment_type = $2 AND batch_id = $3
                          AND (SELECT max(received_at) < now() - make_interval(secs => $4)
                                      AND count(*) < max(parts)
                               FROM snapshot_parts
                               WHERE merchant_id = $1 AND segment_type = $2 AND batch_id = $3)
                        RETURNING parts
                    )
                    SELECT count(*) AS received, max(parts) AS parts FROM gone
                    """,
                    key.merchant_id,
                    key.segment_type,
                    c["batch_id"],
                    older_than_s,
                )
                if gone is None or gone["received"] == 0:
                    continue  # a part came, or it was applied, since the candidates were read
                await conn.execute(
                    "DELETE FROM audience_pending WHERE merchant_id = $1 AND segment_type = $2"
                    " AND kind = 'snapshot' AND batch_id = $3",
                    key.merchant_id,
                    key.segment_type,
                    c["batch_id"],
                )
                applied, _ = await self._drain(conn, key)
            if applied:
                log.warning(
                    "applied %d change(s) of %s that waited behind discarded snapshot %s",
                    applied,
                    key,
                    c["batch_id"],
                )
            stale.append(StaleSnapshot(key, c["batch_id"], gone["received"], gone["parts"]))
        return stale

    async def get(self, key: AudienceKey) -> AudienceInfo | None:
        async with self._pg.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_INFO} FROM audiences"  # nosec B608
                " WHERE merchant_id = $1 AND segment_type = $2",
                key.merchant_id,
                key.segment_type,
            )
        return None if row is None or row["version"] == 0 else _info(row)
