"""Sync counts: read from the Redis mirror (or the ledger), written through, repaired."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence

from service.domain.errors import CacheUnavailable, StorageUnavailable
from service.domain.log_throttle import ThrottledWarning
from service.domain.ports import CounterMirror, PromoStore
from service.domain.rules import ID_RANGE_SHORT, check_id

# One logger for the package: records keep the name they had as one module.
log = logging.getLogger(__package__)


class SyncCounts:
    """The count side of ``PromoService`` (its state is set in ``PromoService.__init__``)."""

    _store: PromoStore
    _mirror: CounterMirror
    _clock: Callable[[], float]
    errors: dict[str, int]
    _warn_mirror: ThrottledWarning

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()

    async def sync_count(self, customer_id: int) -> int:
        check_id(customer_id, "customer_id", ID_RANGE_SHORT)
        now = self._clock()
        try:
            cached = await self._mirror.synced_count(customer_id, now)
        except CacheUnavailable:
            cached = None
        if cached is not None:
            return cached
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        return await self._store.active_sync_count(customer_id, today)

    async def _mirror_counts(self, customer_ids: Sequence[int]) -> None:
        """Write-through of changed counts; the outbox row stays for the reconciler if
        this fails."""
        try:
            await self.mirror_customers(customer_ids)
        except (CacheUnavailable, StorageUnavailable) as exc:
            self.errors["mirror"] += 1
            self._warn_mirror(exc)

    async def mirror_customers(self, customer_ids: Sequence[int], batch: int = 10_000) -> None:
        today = self._today()
        for start in range(0, len(customer_ids), batch):
            counts = await self._store.counts_of(customer_ids[start : start + batch], today)
            await self._mirror.write_counts(counts)
            await self._store.confirm_mirrored(counts)

    async def rebuild_counters(self) -> None:
        """Rebuild phase of the cache: copy every active count into the mirror."""
        async for counts in self._store.all_counts(self._today(), 10_000):
            await self._mirror.write_counts(counts)

    async def scan_counts(self, batch: int = 1000) -> int:
        """Compare every customer's count version in PostgreSQL and Redis; repair the
        ones behind.  Returns how many were repaired."""
        today = self._today()
        after = repaired = 0
        while rows := await self._store.counter_versions(after, batch, today):
            after = rows[-1][0]
            cached = await self._mirror.count_versions([cid for cid, _, _ in rows])
            behind = [
                cid
                for (cid, version, active), rv in zip(rows, cached, strict=True)
                if (rv is None and active) or (rv is not None and rv < version)
            ]
            if behind:
                log.warning("sync count mirror: %d customers behind; repairing", len(behind))
                await self.mirror_customers(behind)
                repaired += len(behind)
        return repaired
