"""The mirror of the promo-sync counters: a versioned key per customer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cache import keys
from cache.base import CacheBase, _guard
from service.domain.promos import CustomerCounts, end_of_day

# A count key with no active promo keeps its version this long, so that a late write of
# an older state still finds it and loses.
_EMPTY_COUNTS_TTL_S = 86_400


class Counters(CacheBase):
    """The promo-sync counts per customer, for the sync's reads."""

    # A customer's key holds its counted promos (promo id -> end, Unix seconds) and its
    # version under the member "#v" (score -version; no promo id starts with "#").
    # Writes are versioned like the user keys: an older state never overwrites a newer.

    async def write_counts(self, counts: Sequence[CustomerCounts]) -> None:
        if not counts:
            return
        default_expiry = int((time.time() + _EMPTY_COUNTS_TTL_S) * 1000)
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for c in counts:
            ends = {promo: end_of_day(day).timestamp() for promo, day in c.promos.items()}
            expire_at = int(max(ends.values()) * 1000) if ends else default_expiry
            args: list[Any] = [c.version, expire_at]
            for promo, until in ends.items():
                args += [promo, repr(until)]
            calls.append(((keys.synced(c.customer_id),), args))
        async with _guard(self._errors):
            for start in range(0, len(calls), 10_000):
                await self._script_calls(self._write_counts, calls[start : start + 10_000])

    async def count_versions(self, customer_ids: Sequence[int]) -> list[int | None]:
        """The version each customer's count key holds (None: no key, or no version)."""
        async with _guard(self._errors), self._r.pipeline(transaction=False) as pipe:
            for cid in customer_ids:
                pipe.zscore(keys.synced(cid), "#v")
            scores = await pipe.execute()
        return [None if s is None else int(-s) for s in scores]

    async def synced_count(self, customer_id: int, now: float) -> int | None:
        async with _guard(self._errors):
            count = await self._call(
                self._count_synced,
                [keys.meta_of(customer_id), keys.synced(customer_id)],
                [f"({now!r}"],
            )
        return None if count is None else int(count)
