"""Pacing for background jobs (cache rebuild, version scan, snapshot ingestion).

Those jobs work in batches and, unpaced, take all the CPU, Redis and PostgreSQL time
they can get, which is time the latency-sensitive reads then wait for.  A ``Pacer``
caps a job at a rate of items per second by sleeping after each batch for whatever the
batch left of its share of time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Pacer:
    """At most ``rate_per_s`` items a second, on average over each batch.

    A batch that took longer than its share earns no credit for the next one: after a
    slow stretch the job goes on at the rate, it does not catch up in a burst (the burst
    is what the reads would feel).  A rate <= 0 means unpaced.
    """

    def __init__(
        self,
        rate_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate_per_s = rate_per_s
        self._clock = clock
        self._sleep = sleep
        self._last: float | None = None
        self.slept_s = 0.0

    def start(self) -> None:
        """Mark the start of the first batch (else the first call only sets the mark)."""
        self._last = self._clock()

    async def __call__(self, items: int) -> None:
        """``items`` were just done: wait until they fit in the rate."""
        now = self._clock()
        if self.rate_per_s <= 0 or self._last is None:
            self._last = now
            return
        due = self._last + items / self.rate_per_s
        if due > now:
            self.slept_s += due - now
            await self._sleep(due - now)
            self._last = due
        else:
            self._last = now
