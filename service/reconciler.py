"""The reconciler process (``segments reconcile``): background upkeep of both stores.

Each round: rebuild the Redis copy if it is incomplete, else drain the cache outbox;
end expired memberships; and on slower clocks keep history partitions ahead, scan
every user (and customer count) for divergence, undo abandoned promo attempts and
delete what failed ones left in CP.  Every step is
idempotent and safe with several reconcilers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from service.bootstrap import Container
from service.domain.errors import CacheUnavailable, StorageUnavailable
from service.observability import (
    DIVERGENCE_FOUND,
    DIVERGENCE_REPAIRED,
    SYNC_COUNTS_REPAIRED,
    set_cache_gauges,
)
from service.pg_metrics import set_outbox_gauges

log = logging.getLogger(__name__)

PARTITION_CHECK_S = 3600.0
OUTBOX_GAUGES_S = 10.0


class _Every:
    """Runs a step at most once per ``interval_s``."""

    def __init__(self, interval_s: float, step: Callable[[], Awaitable[object]]) -> None:
        self._interval = interval_s
        self._step = step
        self._next = 0.0

    async def __call__(self) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self._interval
            await self._step()


async def run(container: Container, stop: asyncio.Event) -> None:
    settings = container.settings
    reconciler = container.reconciler

    async def sweep() -> None:
        swept = 0
        while not stop.is_set():
            n = await container.segments.sweep_expired(settings.sweep_batch)
            swept += n
            if n < settings.sweep_batch:
                break
        if swept:
            log.info("expired memberships ended for %d users", swept)

    async def scan() -> None:
        if await container.cache.is_complete():
            repaired = await container.promos.scan_counts()
            SYNC_COUNTS_REPAIRED.inc(repaired)
            if repaired:
                log.info("scan: %d customers' sync counts repaired in Redis", repaired)
            result = await reconciler.scan()
            DIVERGENCE_FOUND.inc(result.found)
            DIVERGENCE_REPAIRED.inc(result.repaired)
            log.info(
                "scan: %d users, %d behind, %d repaired",
                result.users,
                result.found,
                result.repaired,
            )

    async def gauges() -> None:
        # Every round, so that the age keeps growing while scans fail.
        complete = await container.cache.is_complete()
        set_cache_gauges(complete, await container.cache.freshness(), time.time())

    steps = [
        _Every(PARTITION_CHECK_S, container.store.ensure_history_partitions),
        _Every(0, reconciler.step),
        _Every(0, sweep),
        _Every(settings.scan_interval_s, scan),
        _Every(settings.sync_undo_interval_s, reconciler.promo_round),
        _Every(0, gauges),
        _Every(OUTBOX_GAUGES_S, lambda: set_outbox_gauges(container.figures)),
    ]
    while not stop.is_set():
        for step in steps:
            try:
                await step()
            except (StorageUnavailable, CacheUnavailable) as exc:
                log.warning("reconciler: %s; retrying", exc)
            except Exception:
                log.exception("reconciler step failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_s)
