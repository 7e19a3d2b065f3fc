"""The rebuild of the copy: its lease, its generation in the bucket metas and the
progress mark that lets reads trust users already written."""

from __future__ import annotations

import contextlib
import secrets

from cache import keys
from cache.base import CacheBase, _guard, _text


class Rebuild(CacheBase):
    """One process rebuilds at a time, under a lease; completion is marked per bucket."""

    async def begin_rebuild(self, lease_s: float, generation: str | None = None) -> str | None:
        generation = generation or secrets.token_hex(8)
        async with _guard(self._errors):
            lease_ms = int(lease_s * 1000)
            taken = await self._r.set(keys.REBUILD_LEASE, generation, nx=True, px=lease_ms)
            # Held already: by this generation if an earlier try's SET landed though its
            # reply was lost (renew_lease then extends it), else by another rebuild.
            if not taken and not await self._call(
                self._renew, [keys.REBUILD_LEASE], [generation, lease_ms]
            ):
                return None
            # `building` lives in the meta hashes, so a FLUSHALL (or a shard restart)
            # during the rebuild erases it and the rebuild cannot mark an incomplete
            # copy as complete.  A bucket keeps the progress mark of the rebuild before
            # this one only while it still holds that rebuild's `building`
            # (resume_point); otherwise the mark goes, so no read trusts it.
            try:
                previous = await self._r.hget(keys.META, "building")
                previous = "" if previous is None else _text(previous)
                await self._script_calls(
                    self._take_bucket,
                    [((meta,), [previous, generation]) for meta in keys.ALL_METAS],
                )
                # The server runs this rebuild writes to (is_complete: a restart ends it).
                await self._r.hset(keys.META, "building_runs", await self._run_ids())
            except self._errors:
                # Else the lease outlives this failed start by its whole term, and no
                # process rebuilds meanwhile.
                with contextlib.suppress(*self._errors):
                    await self._call(self._release, [keys.REBUILD_LEASE], [generation])
                raise
        return generation

    async def resume_point(self, generation: str) -> int:
        """The user id up to which every bucket holds a mark this rebuild took over from
        an interrupted one (0: none, start from the first user)."""
        async with _guard(self._errors), self._r.pipeline(transaction=False) as pipe:
            for meta in keys.BUCKET_METAS:
                pipe.hmget(meta, "building", "rebuilt_to")
            replies = await pipe.execute()
        marks = []
        for building, upto in replies:
            if building is None or upto is None or _text(building) != generation:
                return 0
            marks.append(int(upto))
        return min(marks)

    async def progress_mark(self, user_id: int) -> int | None:
        async with _guard(self._errors):
            complete, upto = await self._r.hmget(keys.meta_of(user_id), "complete", "rebuilt_to")
        if complete is not None:
            return None
        return int(upto) if upto is not None else 0

    async def mark_rebuilt(self, generation: str, upto_user_id: int) -> bool:
        """Every user up to ``upto_user_id`` is written: reads may answer them from
        Redis before the rebuild completes.  False when no bucket took the mark (they
        were flushed since ``begin_rebuild``)."""
        async with _guard(self._errors):
            marked = await self._each_bucket(self._mark_progress, [generation, upto_user_id])
        return any(marked)

    async def renew_rebuild(self, generation: str, lease_s: float) -> bool:
        async with _guard(self._errors):
            return bool(
                await self._call(
                    self._renew, [keys.REBUILD_LEASE], [generation, int(lease_s * 1000)]
                )
            )

    async def release_rebuild(self, generation: str) -> None:
        async with _guard(self._errors):
            await self._call(self._release, [keys.REBUILD_LEASE], [generation])

    async def finish_rebuild(self, generation: str) -> bool:
        async with _guard(self._errors):
            run_ids = await self._run_ids()
            marked = all(await self._each_bucket(self._mark_bucket, [generation]))
            return bool(
                await self._call(
                    self._finish,
                    [keys.META, keys.REBUILD_LEASE],
                    [generation, run_ids, "1" if marked else "0"],
                )
            )
