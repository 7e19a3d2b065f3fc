"""The use cases.  HTTP handlers, the consumer and the reconciler all call these.

``SegmentService`` is here with segments and membership changes; its reads are in
``reads.py`` and the upkeep of Redis's copy (write-through, repair, rebuild) in
``cache_copy.py``, which it inherits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from service.domain import rules
from service.domain.errors import (
    InvalidRequest,
    SegmentNotFound,
)
from service.domain.log_throttle import ThrottledWarning
from service.domain.model import AddItem, Registry, Segment
from service.domain.ports import Cache, Store
from service.domain.reads import SegmentReads, _FallbackReads

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AddRequest:
    """One item of an ``add`` list before its expiry is resolved."""

    slug: str
    ttl_seconds: int | None = None
    expires_at: float | None = None


class SegmentService(SegmentReads):
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
        # While a rebuild runs: reads of users above its progress mark (as last asked,
        # at most _MARK_HINT_S ago) go to PostgreSQL without asking Redis first.
        self._mark_hint = 0
        self._mark_hint_until = 0.0
        self._mark_task: asyncio.Task[None] | None = None
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

    async def sweep_expired(self, limit: int = 1000) -> int:
        """End expired memberships in PostgreSQL (history at expiry time) and refresh
        those users in the cache.  Reads never depend on it: they filter by expiry."""
        states = await self._store.sweep_expired(limit)
        await self._write_through(states)
        return len(states)


def _check_slug(slug: str) -> None:
    """A string that is not a valid slug names no segment: answer without a query."""
    if not rules.is_valid_slug(slug):
        raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
