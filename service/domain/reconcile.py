"""The reconciler's use cases: make Redis agree with PostgreSQL, and finish what crashed.

Every step is idempotent and safe to run in several processes at once: outbox rows
are claimed with SKIP LOCKED, cache writes are versioned, and promo attempts are
fenced by their token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.domain.pacing import Pacer
from service.domain.ports import ReconcileCache, ReconcileStore
from service.domain.promos import PromoService
from service.domain.service import SegmentService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScanResult:
    users: int
    found: int
    repaired: int


def _behind(redis_version: int | None, version: int, live: bool) -> bool:
    """Is the cached copy of this user older than PostgreSQL's?"""
    if redis_version is None:
        return live  # no key is right only for a user with nothing to show
    return redis_version < version


class Reconciler:
    def __init__(
        self,
        store: ReconcileStore,
        cache: ReconcileCache,
        segments: SegmentService,
        promos: PromoService,
        *,
        clock: Callable[[], float] = time.time,
        scan_max_users_per_s: float = 0.0,
    ) -> None:
        self._store = store
        self._cache = cache
        self._segments = segments
        self._promos = promos
        self._clock = clock
        self._scan_max_users_per_s = scan_max_users_per_s

    async def drain_outbox(self, batch: int = 1000, min_age_s: float = 1.0) -> int:
        """Write to Redis every change whose write-through may not have happened."""
        total = 0
        while n := await self._store.drain_outbox(batch, min_age_s, self._cache.write_users):
            total += n
            if n < batch:
                break
        return total

    async def scan(self, batch: int = 1000, recheck_after_s: float = 0.5) -> ScanResult:
        """Compare every user's version in PostgreSQL and Redis; repair the ones behind.

        A user found behind is checked again after ``recheck_after_s``, so a
        write-through still in flight is not counted as divergence.
        """
        started = self._clock()
        users = found = repaired = 0
        after = 0
        pace = Pacer(self._scan_max_users_per_s)
        pace.start()
        while rows := await self._store.scan_versions(after, batch):
            await pace(len(rows))
            after = rows[-1][0]
            users += len(rows)
            cached = await self._cache.versions([uid for uid, _, _ in rows])
            suspects = [
                uid
                for (uid, version, live), rv in zip(rows, cached, strict=True)
                if _behind(rv, version, live)
            ]
            if not suspects:
                continue
            await asyncio.sleep(recheck_after_s)
            states = await self._store.user_states_of(suspects)
            again = await self._cache.versions([s.user_id for s in states])
            now = self._clock()
            stale = [
                s
                for s, rv in zip(states, again, strict=True)
                if _behind(
                    rv,
                    s.version,
                    bool(s.excluded) or any(m.expires_at > now for m in s.memberships),
                )
            ]
            if stale:
                log.warning("cache divergence: %d users behind PostgreSQL; repairing", len(stale))
                await self._cache.write_users(stale)
                found += len(stale)
                repaired += len(stale)
        # The copy was confirmed consistent as of the start of this scan.
        await self._cache.record_reconcile(found, repaired, started)
        return ScanResult(users, found, repaired)

    async def promo_round(self) -> None:
        """Undo abandoned promo attempts, delete what failed ones left in CP, retry
        count mirror writes.  A failed attempt is never completed: MPS was told it
        failed."""
        await self._promos.reconcile()

    async def step(self) -> None:
        """One round: rebuild if the copy is incomplete, otherwise drain the outbox."""
        if not await self._cache.is_complete():
            await self._segments.rebuild_cache()
            return
        await self.drain_outbox()
