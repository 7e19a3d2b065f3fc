"""Keeping Redis's copy of PostgreSQL for ``SegmentService``: the write-through after a
commit and its background repair, the segment registry, and full rebuilds under a lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

from service.domain.errors import (
    CacheUnavailable,
    StorageUnavailable,
)
from service.domain.log_throttle import ThrottledWarning
from service.domain.model import Registry, UserState
from service.domain.pacing import Pacer
from service.domain.ports import Cache, Store

# Records keep the logger name they had when SegmentService was one module.
log = logging.getLogger("service.domain.service")

# Pauses before a failed rebuild batch is written again (the pipelined connection
# reconnects meanwhile); then one last try.
_REBUILD_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
# Users a paced rebuild writes between pauses (a few milliseconds of Redis's time).
_REBUILD_PACED_CHUNK = 500


class CacheCopy:
    """The cache side of ``SegmentService`` (its state is set in ``SegmentService.__init__``)."""

    _store: Store
    _cache: Cache
    _dirty: set[int]
    _registry: Registry
    _registry_dirty: bool
    _registry_lock: asyncio.Lock
    _repair_task: asyncio.Task[None] | None
    _rebuild_task: asyncio.Task[bool] | None
    _release_task: asyncio.Task[None] | None
    _next_rebuild_at: float
    _rebuild_delay_s: float
    _rebuild_batch: int
    _rebuild_lease_s: float
    _rebuild_max_users_per_s: float
    _rebuild_phases: list[Callable[[], Awaitable[None]]]
    _warn_write_failed: ThrottledWarning
    _cache_retry_after_s: float
    _skip_cache_until: float
    rebuild_progress: Callable[[int], Awaitable[None]] | None

    async def _write_through(self, states: Sequence[UserState]) -> None:
        try:
            await self._cache.write_users(states)
        except CacheUnavailable:
            # The change is durable in PostgreSQL.  Until Redis has it, this process
            # reads these users from PostgreSQL and keeps retrying the write; if the
            # process dies first, the reconciler finds the change in the outbox.
            self._warn_write_failed()
            self._dirty.update(s.user_id for s in states)
            self._start_repair()

    async def _publish_registry(self) -> None:
        registry = await self._store.registry()
        self._registry = registry
        try:
            await self._cache.write_registry(registry)
        except CacheUnavailable:
            self._warn_write_failed("the segment registry")
            self._registry_dirty = True
            self._start_repair()

    def _start_repair(self) -> None:
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.create_task(self._repair())

    async def _repair(self) -> None:
        """Retry this process's failed cache writes until Redis takes them."""
        while self._dirty or self._registry_dirty:
            await asyncio.sleep(self._cache_retry_after_s / 4)
            try:
                if self._registry_dirty:
                    await self._cache.write_registry(await self._store.registry())
                    self._registry_dirty = False
                users = list(self._dirty)
                if users:
                    await self._cache.write_users(await self._store.user_states_of(users))
                    self._dirty.difference_update(users)
            except (CacheUnavailable, StorageUnavailable):
                continue
        self._warn_write_failed.recovered("Redis takes writes again; failed writes repaired")

    async def _refresh_registry(self, seen_version: int) -> Registry:
        async with self._registry_lock:
            if self._registry.version >= seen_version:
                return self._registry
            registry: Registry | None = None
            with contextlib.suppress(CacheUnavailable):
                registry = await self._cache.read_registry()
            if registry is None or registry.version < seen_version:
                registry = await self._store.registry()
            self._registry = registry
            return registry

    async def _registry_from_store(self, seen_version: int) -> Registry:
        """The registry from PostgreSQL, kept for the next reads, at least as new as
        ``seen_version``."""
        async with self._registry_lock:
            if self._registry.version == seen_version:
                return self._registry
            registry = await self._store.registry()
            if registry.version >= self._registry.version:
                self._registry = registry
            return registry

    def add_rebuild_phase(self, phase: Callable[[], Awaitable[None]]) -> None:
        self._rebuild_phases.append(phase)

    def start_rebuild(self) -> None:
        """Start rebuilding the cache in the background: one at a time per process,
        at most one start a second (every read of an incomplete copy asks)."""
        if self._rebuild_task is not None and not self._rebuild_task.done():
            return
        if time.monotonic() < self._next_rebuild_at:
            return
        self._next_rebuild_at = time.monotonic() + 1.0
        self._rebuild_task = asyncio.create_task(self._rebuild_unless_taken())

    async def _rebuild_unless_taken(self) -> bool:
        """Rebuild after ``rebuild_delay_s``, unless the copy is complete by then or
        another process holds the rebuild.

        The delay leaves the rebuild to the reconciler, which takes it within its
        round: a rebuild in this process would share its event loop with the reads it
        answers from PostgreSQL meanwhile, and stall them.  Without a reconciler, this
        process rebuilds after the delay."""
        if self._rebuild_delay_s > 0:
            await asyncio.sleep(self._rebuild_delay_s)
            try:
                if await self._cache.is_complete():
                    return False
            except CacheUnavailable:
                return False
        return await self.rebuild_cache()

    async def rebuild_cache(self) -> bool:
        """Copy PostgreSQL into Redis, then mark the cache complete.

        Returns False when another process holds the rebuild lease or the cache was
        flushed again meanwhile.  Safe to run concurrently with writes: every user
        write is versioned, so the rebuild never overwrites a newer state.
        """
        generation = secrets.token_hex(8)
        # The lease a failure gives up: this generation's from before it is asked for (a
        # start that fails after its lease landed gives that lease up too).
        ours: str | None = generation
        # Reading the next batch from PostgreSQL overlaps writing this one to Redis.
        writing: asyncio.Task[None] | None = None
        try:
            if await self._begin_rebuild(generation) is None:
                ours = None  # held by another process
                return False
            started = time.monotonic()
            await self._cache.write_registry(await self._store.registry())
            # Users up to an interrupted rebuild's mark stand (it wrote them, no flush
            # since, and later writes are versioned): a rebuild of millions cut short
            # near its end does not start over, and reads of them stay on Redis.
            resume = await self._cache.resume_point(generation)
            if resume:
                log.info("cache rebuild: resuming after user %d", resume)
            users = 0
            if self.rebuild_progress is not None:
                await self.rebuild_progress(0)
            next_progress = started + 5
            pace = Pacer(self._rebuild_max_users_per_s)
            pace.start()
            async for batch in self._store.user_states(self._rebuild_batch_size(), resume):
                if writing is not None:
                    await writing
                if not await self._renew_rebuild(generation):
                    log.warning("cache rebuild lost its lease; another process continues")
                    return False
                writing = asyncio.create_task(self._write_rebuild_batch(batch, generation, pace))
                users += len(batch)
                if self.rebuild_progress is not None:
                    await self.rebuild_progress(users)
                if time.monotonic() >= next_progress:
                    elapsed = time.monotonic() - started
                    log.info("cache rebuild: %d users so far (%.0f/s)", users, users / elapsed)
                    next_progress += 5
            if writing is not None:
                await writing
            for phase in self._rebuild_phases:
                await phase()
            done = await self._cache.finish_rebuild(generation)
            if not done:  # superseded: the next rebuild need not wait out the lease
                self._give_up_lease(generation)
        except (CacheUnavailable, StorageUnavailable) as exc:
            log.warning("cache rebuild interrupted: %s", exc)
            self._give_up_lease(ours)
            return False
        except Exception:
            log.exception("cache rebuild failed")
            self._give_up_lease(ours)
            return False
        finally:
            if writing is not None and not writing.done():
                # A rebuild that ended early leaves no batch writing (and marking)
                # behind it.
                writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)
        log.info(
            "cache rebuild %s: %d users in %.2fs",
            "complete" if done else "superseded",
            users,
            time.monotonic() - started,
        )
        return done

    async def _begin_rebuild(self, generation: str) -> str | None:
        """Take the rebuild lease, tried again after a Redis timeout: right after a
        FLUSHALL of millions of keys Valkey stalls past the read timeout, and a rebuild
        given up then is taken over by an API process, in the loop that serves reads.
        Every try asks under the same generation: a try whose reply was lost may have
        taken the lease, and the next one takes it over rather than waiting it out."""
        for delay in _REBUILD_RETRY_DELAYS_S:
            try:
                return await self._cache.begin_rebuild(self._rebuild_lease_s, generation)
            except CacheUnavailable as exc:
                log.warning("cache rebuild: starting failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        return await self._cache.begin_rebuild(self._rebuild_lease_s, generation)

    async def _renew_rebuild(self, generation: str) -> bool:
        """Extend the lease, tried again after a Redis timeout (the lease outlasts the
        retries); False when the lease was lost."""
        for delay in _REBUILD_RETRY_DELAYS_S:
            try:
                return await self._cache.renew_rebuild(generation, self._rebuild_lease_s)
            except CacheUnavailable as exc:
                log.warning("cache rebuild: renewing failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        return await self._cache.renew_rebuild(generation, self._rebuild_lease_s)

    def _rebuild_batch_size(self) -> int:
        """Users a PostgreSQL query of the rebuild reads: paced, about a quarter of a
        second's worth, so that PostgreSQL works in small steps too."""
        rate = self._rebuild_max_users_per_s
        if rate <= 0:
            return self._rebuild_batch
        return max(_REBUILD_PACED_CHUNK, min(self._rebuild_batch, int(rate / 4)))

    async def _write_rebuild_batch(
        self, batch: Sequence[UserState], generation: str, pace: Pacer
    ) -> None:
        """One batch of a rebuild; paced, in chunks with a pause after each, so that
        the reads Redis serves meanwhile never queue behind a whole batch.

        Then the batch's last user is marked as reached (batches come in user order), so
        reads of the users behind it are answered from Redis rather than PostgreSQL
        while the rest is written."""
        chunk = len(batch) if pace.rate_per_s <= 0 else _REBUILD_PACED_CHUNK
        for i in range(0, len(batch), chunk):
            part = batch[i : i + chunk]
            await self._write_rebuild_chunk(part)
            await pace(len(part))
        try:
            await self._cache.mark_rebuilt(generation, batch[-1].user_id)
        except CacheUnavailable as exc:
            # Not worth the rebuild: the next batch's mark covers this one's users.
            log.warning("cache rebuild: marking progress failed (%s)", exc)

    async def _write_rebuild_chunk(self, states: Sequence[UserState]) -> None:
        """Tried again after a failure: one Redis reply slower than the read timeout
        must not throw away a rebuild of millions of users (at 10 million it did, on a
        busy machine); the writes are versioned, so repeating them is harmless.  Redis
        still failing after the retries ends the rebuild."""
        for delay in _REBUILD_RETRY_DELAYS_S:
            try:
                await self._cache.write_users(states)
                return
            except CacheUnavailable as exc:
                log.warning("cache rebuild: a batch write failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        await self._cache.write_users(states)

    def _give_up_lease(self, generation: str | None) -> None:
        """A failed rebuild releases its lease, so the next one (the next read of the
        incomplete copy asks for it) starts within a second, not after the lease's 30 s.
        In the background: Redis may still be away, and the caller should not wait."""
        if generation is None:
            return

        async def release() -> None:
            deadline = time.monotonic() + self._rebuild_lease_s
            while time.monotonic() < deadline:
                try:
                    await self._cache.release_rebuild(generation)
                    self._next_rebuild_at = 0.0
                    return
                except CacheUnavailable:
                    await asyncio.sleep(0.25)

        self._release_task = asyncio.create_task(release())

    async def cache_complete(self) -> bool:
        try:
            return await self._cache.is_complete()
        except CacheUnavailable:
            return False
