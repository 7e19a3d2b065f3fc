"""The use cases.  HTTP handlers, the consumer and the reconciler all call these."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from service.domain import rules
from service.domain.errors import (
    CacheUnavailable,
    InvalidRequest,
    SegmentNotFound,
    StorageUnavailable,
)
from service.domain.log_throttle import ThrottledWarning
from service.domain.model import AddItem, Registry, Segment, UserState
from service.domain.pacing import Pacer
from service.domain.ports import Cache, Store

log = logging.getLogger(__name__)

# Pauses before a failed rebuild batch is written again (the pipelined connection
# reconnects meanwhile); then one last try.
_REBUILD_RETRY_DELAYS_S = (0.5, 1.0, 2.0)


# Users per PostgreSQL query of the fallback read.
_FALLBACK_BATCH = 500

_Answer = tuple[UserState, int]


class _FallbackReads:
    """Reads answered from PostgreSQL, many users a query: the reads that arrive while
    every permitted query is under way wait and go together in the next one.  One
    statement per query (one snapshot), sent after every read it answers arrived, so a
    read never answers older than a write acknowledged before it."""

    def __init__(
        self,
        fetch: Callable[[Sequence[int]], Awaitable[tuple[dict[int, UserState], int]]],
        permits: asyncio.Semaphore,
        runners: int,
    ) -> None:
        self._fetch = fetch
        self._permits = permits
        self._runners = runners
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0
        self._waiting: dict[int, list[asyncio.Future[_Answer]]] = {}

    async def read(self, user_id: int) -> _Answer:
        future: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user_id, []).append(future)
        if self._running < self._runners:
            # Counted here and uncounted as the runner returns (not in a done callback,
            # which runs later): a read never waits for a runner that has left.
            self._running += 1
            task = asyncio.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _run(self) -> None:
        try:
            await self._drain()
        finally:
            self._running -= 1

    async def _drain(self) -> None:
        while self._waiting:
            async with self._permits:
                if not self._waiting:
                    return
                ids = list(itertools.islice(self._waiting, _FALLBACK_BATCH))
                batch = {uid: self._waiting.pop(uid) for uid in ids}
                try:
                    states, registry_version = await self._fetch(ids)
                except Exception as exc:  # every read of the batch gets the failure
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(exc)
                    continue
            for uid, futures in batch.items():
                answer = (states.get(uid) or UserState(uid, 0), registry_version)
                for f in futures:
                    if not f.done():  # its caller may have gone away
                        f.set_result(answer)


@dataclass(frozen=True, slots=True)
class AddRequest:
    """One item of an ``add`` list before its expiry is resolved."""

    slug: str
    ttl_seconds: int | None = None
    expires_at: float | None = None


class SegmentService:
    def __init__(
        self,
        store: Store,
        cache: Cache,
        *,
        clock: Callable[[], float] = time.time,
        max_items: int = rules.MAX_LIST_ITEMS,
        fallback_concurrency: int = 16,
        rebuild_batch: int = 5000,
        rebuild_lease_s: float = 30.0,
        cache_retry_after_s: float = 1.0,
        rebuild_max_users_per_s: float = 0.0,
        rebuild_delay_s: float = 0.0,
    ) -> None:
        self._store = store
        self._cache = cache
        self._clock = clock
        self._max_items = max_items
        self._fallback = asyncio.Semaphore(fallback_concurrency)
        self._fallback_reads = _FallbackReads(
            store.user_states_for_read, self._fallback, fallback_concurrency
        )
        self._rebuild_batch = rebuild_batch
        self._rebuild_lease_s = rebuild_lease_s
        self._rebuild_max_users_per_s = rebuild_max_users_per_s
        # A small circuit breaker: after Redis fails to answer, reads skip it until
        # this monotonic time, instead of each paying the timeout.
        self._cache_retry_after_s = cache_retry_after_s
        self._skip_cache_until = 0.0
        # Users (and the registry) whose cache write failed after commit: read from
        # PostgreSQL until a background retry lands the write.
        self._dirty: set[int] = set()
        self._registry_dirty = False
        self._repair_task: asyncio.Task[None] | None = None
        self._registry = Registry(version=0)
        self._registry_lock = asyncio.Lock()
        self._rebuild_task: asyncio.Task[bool] | None = None
        self._next_rebuild_at = 0.0
        self._rebuild_delay_s = rebuild_delay_s
        self._release_task: asyncio.Task[None] | None = None
        # One line per write while Redis is down buried the logs: a line per 10 s.
        self._warn_write_failed = ThrottledWarning(
            log, "cache write failed after commit; repairing in the background"
        )
        # Other parts of the cache (e.g. sync counters) rebuilt with the same lease and
        # before the same completeness marker.
        self._rebuild_phases: list[Callable[[], Awaitable[None]]] = []
        # Counters for readiness and metrics.
        self.reads_from_cache = 0
        self.reads_from_store = 0
        # For metrics: awaited with 0 when a rebuild starts, then with the users written.
        self.rebuild_progress: Callable[[int], Awaitable[None]] | None = None

    # -- segments -------------------------------------------------------------

    async def create_segment(
        self, slug: str, description: str = "", auto_percent: float | None = None
    ) -> Segment:
        if not rules.is_valid_slug(slug):
            raise InvalidRequest(
                f"invalid slug; a slug matches {rules.SLUG_PATTERN}", {"slug": slug}
            )
        rules.check_text(description, "description")
        auto_bp = None if auto_percent is None else rules.percent_to_bp(auto_percent)
        segment = await self._store.create_segment(slug, description, auto_bp)
        await self._publish_registry()
        return segment

    async def list_segments(self) -> list[Segment]:
        return await self._store.list_segments()

    async def get_segment(self, slug: str) -> Segment:
        segment = await self._store.get_segment(slug) if rules.is_valid_slug(slug) else None
        if segment is None:
            raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
        return segment

    async def update_segment(
        self,
        slug: str,
        *,
        description: str | None = None,
        auto_percent: float | None = None,
        set_auto: bool = False,
    ) -> Segment:
        """Change the description and/or the percentage rule (``set_auto``; None drops it).

        Buckets are fixed per (segment, user), so raising the share only adds users.
        """
        _check_slug(slug)
        if description is not None:
            rules.check_text(description, "description")
        auto_bp = None if auto_percent is None else rules.percent_to_bp(auto_percent)
        segment = await self._store.update_segment(
            slug, description=description, auto_bp=auto_bp, set_auto=set_auto
        )
        await self._publish_registry()
        return segment

    async def delete_segment(self, slug: str) -> Segment:
        _check_slug(slug)
        segment = await self._store.delete_segment(slug)
        await self._publish_registry()
        return segment

    # -- memberships ----------------------------------------------------------

    async def update_user(
        self, user_id: int, add: Sequence[AddRequest], remove: Sequence[str]
    ) -> list[str]:
        """Apply ``add``/``remove`` atomically; answer the user's segments after it."""
        now = self._clock()
        items = [
            AddItem(a.slug, rules.resolve_expiry(now, a.ttl_seconds, a.expires_at, a.slug))
            for a in add
        ]
        change = rules.validate_change(user_id, items, remove, max_items=self._max_items)
        applied = await self._store.apply_change(change, [i.expires_at for i in items])
        state = applied.state
        await self._write_through([state])
        # Answer from the committed state and a registry at least as new as the one
        # the change saw: what the next read of this user answers, without reading.
        registry = self._registry
        if registry.version < applied.registry_version:
            registry = await self._refresh_registry(applied.registry_version)
        now = self._clock()
        live = [m.segment_id for m in state.memberships if m.expires_at > now]
        return rules.visible_slugs(registry, user_id, live, state.excluded)

    async def user_segments(self, user_id: int) -> list[str]:
        if not rules.is_valid_user_id(user_id):
            raise rules.bad_id("user_id", user_id)
        now = self._clock()
        cached = None
        if (
            time.monotonic() >= self._skip_cache_until
            and user_id not in self._dirty
            and not self._registry_dirty
        ):
            try:
                cached = await self._cache.read_user(user_id, now)
                if cached is None:
                    self.start_rebuild()  # Redis answered: the copy is incomplete
            except CacheUnavailable:
                self._skip_cache_until = time.monotonic() + self._cache_retry_after_s
        if cached is None:
            return await self._read_from_store(user_id, now)
        self.reads_from_cache += 1
        registry = self._registry
        if cached.registry_version != registry.version:
            registry = await self._refresh_registry(cached.registry_version)
        return rules.visible_slugs(registry, user_id, cached.member_ids, cached.excluded_ids)

    async def sweep_expired(self, limit: int = 1000) -> int:
        """End expired memberships in PostgreSQL (history at expiry time) and refresh
        those users in the cache.  Reads never depend on it: they filter by expiry."""
        states = await self._store.sweep_expired(limit)
        await self._write_through(states)
        return len(states)

    async def users_segments(self, user_ids: Sequence[int]) -> dict[int, list[str]]:
        """Many users at once: one Redis round trip, or one PostgreSQL query."""
        bad = [uid for uid in user_ids if not rules.is_valid_user_id(uid)]
        if bad:
            raise InvalidRequest(
                f"user ids must be integers in {rules.ID_RANGE}",
                {"user_ids": bad[:10]},
            )
        if len(user_ids) > self._max_items:
            raise InvalidRequest(f"at most {self._max_items} user ids per request")
        unique = list(dict.fromkeys(user_ids))
        now = self._clock()
        cached = None
        if time.monotonic() >= self._skip_cache_until and not self._registry_dirty:
            try:
                cached = await self._cache.read_users(unique, now)
                if cached is None:
                    self.start_rebuild()
            except CacheUnavailable:
                self._skip_cache_until = time.monotonic() + self._cache_retry_after_s
        if cached is None or self._dirty.intersection(unique):
            return await self._read_many_from_store(unique, now)
        self.reads_from_cache += 1
        registry = self._registry
        # Buckets take a registry change one after another: follow the newest seen.
        newest = max((c.registry_version for c in cached), default=registry.version)
        if newest != registry.version:
            registry = await self._refresh_registry(newest)
        return {
            uid: rules.visible_slugs(registry, uid, c.member_ids, c.excluded_ids)
            for uid, c in zip(unique, cached, strict=True)
        }

    async def _read_many_from_store(
        self, user_ids: Sequence[int], now: float
    ) -> dict[int, list[str]]:
        self.reads_from_store += 1
        async with self._fallback:
            states, registry_version = await self._store.user_states_for_read(user_ids)
        registry = self._registry
        if registry.version != registry_version:
            registry = await self._registry_from_store(registry_version)
        out = {}
        for uid in user_ids:
            state = states.get(uid, UserState(uid, 0))
            live = [m.segment_id for m in state.memberships if m.expires_at > now]
            out[uid] = rules.visible_slugs(registry, uid, live, state.excluded)
        return out

    async def _read_from_store(self, user_id: int, now: float) -> list[str]:
        """Answer from PostgreSQL while the cache is incomplete or unreachable."""
        self.reads_from_store += 1
        # The state and the registry's version; the registry itself only when that
        # version is not the one this process holds.
        state, registry_version = await self._fallback_reads.read(user_id)
        registry = self._registry
        if registry.version != registry_version:
            registry = await self._registry_from_store(registry_version)
        live = [m.segment_id for m in state.memberships if m.expires_at > now]
        return rules.visible_slugs(registry, user_id, live, state.excluded)

    # -- the cache ------------------------------------------------------------

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
        generation: str | None = None
        try:
            generation = await self._cache.begin_rebuild(self._rebuild_lease_s)
            if generation is None:
                return False
            started = time.monotonic()
            await self._cache.write_registry(await self._store.registry())
            users = 0
            if self.rebuild_progress is not None:
                await self.rebuild_progress(0)
            next_progress = started + 5
            # Reading the next batch from PostgreSQL overlaps writing this one to Redis.
            writing: asyncio.Task[None] | None = None
            pace = Pacer(self._rebuild_max_users_per_s)
            pace.start()
            async for batch in self._store.user_states(self._rebuild_batch):
                if writing is not None:
                    await writing
                await pace(len(batch))
                if not await self._cache.renew_rebuild(generation, self._rebuild_lease_s):
                    log.warning("cache rebuild lost its lease; another process continues")
                    return False
                writing = asyncio.create_task(self._write_rebuild_batch(batch, generation))
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
        except (CacheUnavailable, StorageUnavailable) as exc:
            log.warning("cache rebuild interrupted: %s", exc)
            self._give_up_lease(generation)
            return False
        except Exception:
            log.exception("cache rebuild failed")
            self._give_up_lease(generation)
            return False
        log.info(
            "cache rebuild %s: %d users in %.2fs",
            "complete" if done else "superseded",
            users,
            time.monotonic() - started,
        )
        return done

    async def _write_rebuild_batch(self, batch: Sequence[UserState], generation: str) -> None:
        """One batch of a rebuild, tried again after a failure: one Redis reply slower
        than the read timeout must not throw away a rebuild of millions of users (at
        10 million it did, on a busy machine); the writes are versioned, so repeating
        them is harmless.  Redis still failing after the retries ends the rebuild.

        Then the batch's last user is marked as reached (batches come in user order), so
        reads of the users behind it are answered from Redis rather than PostgreSQL
        while the rest is written."""
        for delay in _REBUILD_RETRY_DELAYS_S:
            try:
                await self._cache.write_users(batch)
                break
            except CacheUnavailable as exc:
                log.warning("cache rebuild: a batch write failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        else:
            await self._cache.write_users(batch)
        try:
            await self._cache.mark_rebuilt(generation, batch[-1].user_id)
        except CacheUnavailable as exc:
            # Not worth the rebuild: the next batch's mark covers this one's users.
            log.warning("cache rebuild: marking progress failed (%s)", exc)

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


def _check_slug(slug: str) -> None:
    """A string that is not a valid slug names no segment: answer without a query."""
    if not rules.is_valid_slug(slug):
        raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
