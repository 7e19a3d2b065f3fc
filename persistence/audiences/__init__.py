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

The package: ``members`` (a replace, a patch, the history row, reading an audience),
``queue`` (log order: staging snapshots, the queue behind them, discarding stale ones)
and here the two ways in: a change from the API, a batch from Kafka with its offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

from persistence.audiences.members import PACED_COPY_ROWS, AudienceMembers
from persistence.audiences.queue import AUDIENCE_QUEUE_LOCK, DUPLICATE_LOOKBACK, AudienceQueue
from service.domain.audiences import AudienceChange, AudienceInfo


class PgAudienceStore(AudienceQueue):
    """The audiences (``service.domain.ports.AudienceStore``) in PostgreSQL."""

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


__all__ = [
    "AUDIENCE_QUEUE_LOCK",
    "DUPLICATE_LOOKBACK",
    "PACED_COPY_ROWS",
    "AudienceMembers",
    "AudienceQueue",
    "PgAudienceStore",
]
