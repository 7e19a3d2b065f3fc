"""Reads of users' segments for ``SegmentService``: from Redis, or from PostgreSQL
(many users a query) while the copy cannot answer."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence

from service.domain import rules
from service.domain.cache_copy import CacheCopy
from service.domain.errors import (
    CacheUnavailable,
    InvalidRequest,
    StorageUnavailable,
)
from service.domain.model import UserState

# Users per PostgreSQL query of the fallback read.
_FALLBACK_BATCH = 500
# How long a rebuild's progress mark, once asked, decides which reads skip Redis: the
# mark only moves up during a rebuild, so a stale one sends a few reads Redis could
# have answered to PostgreSQL, never a wrong answer.
_MARK_HINT_S = 0.1

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
            if self._running == 0 and self._waiting:
                # The last runner was cancelled (shutdown): no read may wait forever.
                waiting, self._waiting = self._waiting, {}
                _fail(waiting, _stopped())

    async def _drain(self) -> None:
        while self._waiting:
            async with self._permits:
                if not self._waiting:
                    return
                ids = list(itertools.islice(self._waiting, _FALLBACK_BATCH))
                batch = {uid: self._waiting.pop(uid) for uid in ids}
                try:
                    states, registry_version = await self._fetch(ids)
                except BaseException as exc:  # every read of the batch gets the failure
                    _fail(batch, _stopped() if isinstance(exc, asyncio.CancelledError) else exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
            for uid, futures in batch.items():
                answer = (states.get(uid) or UserState(uid, 0), registry_version)
                for f in futures:
                    if not f.done():  # its caller may have gone away
                        f.set_result(answer)


def _fail(waiting: dict[int, list[asyncio.Future[_Answer]]], exc: BaseException) -> None:
    for futures in waiting.values():
        for f in futures:
            if not f.done():  # its caller may have gone away
                f.set_exception(exc)


def _stopped() -> StorageUnavailable:
    return StorageUnavailable("reads from PostgreSQL stopped (shutting down)")


class SegmentReads(CacheCopy):
    """The read side of ``SegmentService`` (its state is set in ``SegmentService.__init__``)."""

    _clock: Callable[[], float]
    _max_items: int
    _fallback: asyncio.Semaphore
    _fallback_reads: _FallbackReads
    _mark_hint: int
    _mark_hint_until: float
    _mark_task: asyncio.Task[None] | None
    reads_from_cache: int
    reads_from_store: int

    async def user_segments(self, user_id: int) -> list[str]:
        if not rules.is_valid_user_id(user_id):
            raise rules.bad_id("user_id", user_id)
        now = self._clock()
        cached = None
        monotonic = time.monotonic()
        if (
            monotonic >= self._skip_cache_until
            and user_id not in self._dirty
            and not self._registry_dirty
            and not (user_id > self._mark_hint and monotonic < self._mark_hint_until)
        ):
            try:
                cached = await self._cache.read_user(user_id, now)
                if cached is None:
                    self.start_rebuild()  # Redis answered: the copy is incomplete
                    self._learn_mark(user_id)
            except CacheUnavailable:
                self._skip_cache_until = time.monotonic() + self._cache_retry_after_s
        if cached is None:
            return await self._read_from_store(user_id, now)
        self.reads_from_cache += 1
        registry = self._registry
        if cached.registry_version != registry.version:
            registry = await self._refresh_registry(cached.registry_version)
        return rules.visible_slugs(registry, user_id, cached.member_ids, cached.excluded_ids)

    def _learn_mark(self, user_id: int) -> None:
        """Ask, in the background and at most every _MARK_HINT_S, how far the rebuild
        has come: the reads above its mark need not ask Redis first (during a rebuild
        Redis is the busiest part, and its answer for them is "not yet")."""
        if time.monotonic() < self._mark_hint_until:
            return
        if self._mark_task is not None and not self._mark_task.done():
            return

        async def learn() -> None:
            try:
                mark = await self._cache.progress_mark(user_id)
            except CacheUnavailable:
                return
            if mark is None:  # complete after all
                self._mark_hint_until = 0.0
            else:
                self._mark_hint = mark
                self._mark_hint_until = time.monotonic() + _MARK_HINT_S

        self._mark_task = asyncio.create_task(learn())

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
