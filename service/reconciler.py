"""The reconciler process (``segments reconcile``): background upkeep of both stores.

Today it runs the expiry sweeper and keeps next months' history partitions created.
Every step is idempotent and safe with several reconcilers at once (row locks with
SKIP LOCKED; ``CREATE TABLE IF NOT EXISTS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from service.bootstrap import Container
from service.domain.errors import StorageUnavailable

log = logging.getLogger(__name__)

PARTITION_CHECK_S = 3600.0


async def run(container: Container, stop: asyncio.Event) -> None:
    settings = container.settings
    next_partition_check = 0.0
    while not stop.is_set():
        try:
            if time.monotonic() >= next_partition_check:
                await container.store.ensure_history_partitions()
                next_partition_check = time.monotonic() + PARTITION_CHECK_S
            swept = 0
            while not stop.is_set():
                n = await container.segments.sweep_expired(settings.sweep_batch)
                swept += n
                if n < settings.sweep_batch:
                    break
            if swept:
                log.info("expired memberships ended for %d users", swept)
        except StorageUnavailable as exc:
            log.warning("reconciler: %s; retrying", exc)
        except Exception:
            log.exception("reconciler step failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_s)
