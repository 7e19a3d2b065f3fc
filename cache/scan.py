"""What the reconciler reads and records: the versions users' keys hold, the divergence
counters and when the copy was last confirmed consistent."""

from __future__ import annotations

from collections.abc import Sequence

from cache import keys
from cache.base import CacheBase, _guard


class Scan(CacheBase):
    """The reconciler's view of the copy."""

    async def versions(self, user_ids: Sequence[int]) -> list[int | None]:
        """The version each user's key holds (None: no key)."""
        if not self._cluster:
            # One script call for the batch: a pipeline of one ZSCORE per user cost
            # redis-py's packing and parsing per command, most of a full scan's time.
            async with _guard(self._errors):
                (raw,) = await self._script_calls(
                    self._versions, [([keys.user(uid) for uid in user_ids], [])]
                )
            return [None if s is None else -int(float(s)) for s in raw]
        async with _guard(self._errors), self._r.pipeline(transaction=False) as pipe:
            for uid in user_ids:
                pipe.zscore(keys.user(uid), "v")
            scores = await pipe.execute()
        return [None if s is None else int(-s) for s in scores]

    async def record_reconcile(self, found: int, repaired: int, confirmed_at: float | None) -> None:
        """Divergence counters and the last time the copy was confirmed consistent
        (LaunchDarkly's ``synchronized_on``), kept in the meta hash for every process."""
        async with _guard(self._errors), self._r.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.META, "divergence_found", found)
            pipe.hincrby(keys.META, "divergence_repaired", repaired)
            if confirmed_at is not None:
                pipe.hset(keys.META, "synchronized_on", repr(confirmed_at))
            await pipe.execute()

    async def freshness(self) -> dict[str, float]:
        async with _guard(self._errors):
            raw = await self._r.hmget(
                keys.META, ["synchronized_on", "divergence_found", "divergence_repaired"]
            )
        names = ("synchronized_on", "divergence_found", "divergence_repaired")
        return {n: float(v) for n, v in zip(names, raw, strict=True) if v is not None}
