"""Kafka's log order per audience: a snapshot in parts waits in ``audience_pending``
until its last part is in, with every later change of its audience queued behind it;
stale snapshots are discarded and what waited behind them applied."""

from __future__ import annotations

import logging

from persistence.audiences.members import AudienceMembers
from persistence.store import Conn
from service.domain.audiences import AudienceChange, AudienceKey, StaleSnapshot

# pg_advisory_xact_lock(AUDIENCE_QUEUE_LOCK, hashtext(key)): serialises the changes of
# one audience's queue (the consumer of its partition and any process's stale-snapshot
# clean-up).  The two-int form is a key space of its own (store.REGISTRY_LOCK is a bigint).
AUDIENCE_QUEUE_LOCK = 0x5E6_0002

# How far back a first part's batch_id is looked for among the audience's applied
# changes (a late duplicate of an applied snapshot's part is skipped).
DUPLICATE_LOOKBACK = 10_000

log = logging.getLogger(__name__)


class AudienceQueue(AudienceMembers):
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
