"""In-memory fakes of the domain's ports (``service/domain/ports.py``), for fast unit
tests of the service layer.

They follow the same contracts as the real adapters (versioned cache writes, the
completeness marker, atomic changes, the cache outbox, snapshots staged in parts, Kafka
offsets applied once), which the integration tests check on the real servers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from service.domain.audiences import AudienceChange, AudienceInfo, AudienceKey, StaleSnapshot
from service.domain.changes import SegmentRef, plan_change
from service.domain.errors import CacheUnavailable, SegmentExists, SegmentNotFound
from service.domain.model import (
    NEVER,
    AppliedChange,
    CachedUser,
    Membership,
    Registry,
    RegistryEntry,
    Segment,
    UserChange,
    UserState,
)
from service.domain.promos.model import Claim, Cleanup, CustomerCounts, Promo


class FakeStore:
    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}
        self.deleted: set[int] = set()
        self.seg_version: dict[int, int] = {}
        self.members: dict[int, dict[int, float | None]] = {}
        self.excluded: dict[int, set[int]] = {}
        self.versions: dict[int, int] = {}
        self.history: list[tuple[int, str, str, float]] = []
        # (user_id, created at): changes whose cache write the reconciler confirms.
        self.outbox: list[tuple[int, float]] = []
        self.partition_checks = 0
        self.closed = False
        self._seq = 0
        self.now = 1_000_000.0

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _live(self, slug: str) -> Segment | None:
        for sid, s in self.segments.items():
            if s.slug == slug and sid not in self.deleted:
                return s
        return None

    async def create_segment(self, slug: str, description: str, auto_bp: int | None) -> Segment:
        if self._live(slug):
            raise SegmentExists("exists", {"slug": slug})
        sid = self._next()
        seg = Segment(sid, slug, description, auto_bp, dt.datetime.now(dt.UTC))
        self.segments[sid] = seg
        self.seg_version[sid] = self._next()
        return seg

    async def list_segments(self) -> list[Segment]:
        return sorted(
            (s for s in self.segments.values() if s.id not in self.deleted), key=lambda s: s.slug
        )

    async def get_segment(self, slug: str) -> Segment | None:
        return self._live(slug)

    async def delete_segment(self, slug: str) -> Segment:
        seg = self._live(slug)
        if seg is None:
            raise SegmentNotFound("missing", {"slugs": [slug]})
        self.deleted.add(seg.id)
        self.seg_version[seg.id] = self._next()
        for uid, rows in self.members.items():
            if rows.pop(seg.id, "absent") != "absent":
                self.history.append((uid, slug, "remove", self.now))
        return seg

    async def apply_change(
        self, change: UserChange, expiries: Sequence[float | None]
    ) -> AppliedChange:
        uid = change.user_id
        slugs = [a.slug for a in change.add] + list(change.remove)
        found = {}
        for slug in slugs:
            seg = self._live(slug)
            if seg is not None:
                found[slug] = SegmentRef(seg.id, seg.slug, seg.auto_bp)
        unknown = sorted(set(slugs) - set(found))
        if unknown:
            raise SegmentNotFound("unknown", {"slugs": unknown})
        rows = self.members.setdefault(uid, {})
        excl = self.excluded.setdefault(uid, set())
        plan = plan_change(change, expiries, found, dict(rows), frozenset(excl), self.now)
        for sid, exp in plan.upsert:
            rows[sid] = exp
        for sid in plan.delete:
            rows.pop(sid, None)
        excl.update(plan.exclude)
        excl.difference_update(plan.unexclude)
        for e in plan.events:
            self.history.append((uid, e.slug, e.operation, e.occurred_at))
        self.versions[uid] = self._next()
        self.outbox.append((uid, self.now))
        return AppliedChange(await self.user_state(uid), (await self.registry()).version)

    async def user_states_for_read(
        self, user_ids: Sequence[int]
    ) -> tuple[dict[int, UserState], int]:
        states = {u: await self.user_state(u) for u in user_ids}
        return states, (await self.registry()).version

    async def user_state(self, user_id: int) -> UserState:
        rows = self.members.get(user_id, {})
        return UserState(
            user_id,
            self.versions.get(user_id, 0),
            tuple(Membership(s, NEVER if e is None else e) for s, e in rows.items()),
            frozenset(self.excluded.get(user_id, set())),
        )

    async def user_states_of(self, user_ids: Sequence[int]) -> list[UserState]:
        return [await self.user_state(u) for u in user_ids]

    async def registry(self) -> Registry:
        return Registry(
            max(self.seg_version.values(), default=0),
            {
                sid: RegistryEntry(s.slug, s.auto_bp)
                for sid, s in self.segments.items()
                if sid not in self.deleted
            },
        )

    async def user_states(self, batch_size: int, after: int = 0) -> AsyncIterator[list[UserState]]:
        uids = sorted(u for u in self.versions if u > after)
        for i in range(0, len(uids), batch_size):
            yield [await self.user_state(u) for u in uids[i : i + batch_size]]

    async def sweep_expired(self, limit: int) -> list[UserState]:
        """End expired memberships (logged at their expiry), bump versions, add outbox rows."""
        users = sorted(
            uid
            for uid, rows in self.members.items()
            if any(e is not None and e <= self.now for e in rows.values())
        )[:limit]
        for uid in users:
            rows = self.members[uid]
            for sid, exp in list(rows.items()):
                if exp is not None and exp <= self.now:
                    del rows[sid]
                    self.history.append((uid, self.segments[sid].slug, "remove", exp))
            self.versions[uid] = self._next()
            self.outbox.append((uid, self.now))
        return await self.user_states_of(users)

    async def drain_outbox(
        self, limit: int, min_age_s: float, apply: Callable[[list[UserState]], Awaitable[None]]
    ) -> int:
        """Hand the states of users with old enough outbox rows to ``apply``; drop those
        rows only if it succeeds."""
        rows = [r for r in self.outbox if r[1] < self.now - min_age_s][:limit]
        if not rows:
            return 0
        await apply(await self.user_states_of(sorted({uid for uid, _ in rows})))
        for row in rows:
            self.outbox.remove(row)
        return len(rows)

    async def scan_versions(self, after_user_id: int, limit: int) -> list[tuple[int, int, bool]]:
        out = []
        for uid in sorted(u for u in self.versions if u > after_user_id)[:limit]:
            live = bool(self.excluded.get(uid)) or any(
                e is None or e > self.now for e in self.members.get(uid, {}).values()
            )
            out.append((uid, self.versions[uid], live))
        return out

    async def ensure_history_partitions(self, months_ahead: int = 3) -> None:
        self.partition_checks += 1

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True


class FakeCache:
    def __init__(self) -> None:
        self.users: dict[int, UserState] = {}
        self.registry: Registry | None = None
        self.complete: str | None = None
        self.building: str | None = None
        self.lease: str | None = None
        self.rebuilt_to: int | None = None
        self.down = False
        self.meta: dict[str, float] = {}
        self.counts: dict[int, tuple[int, int]] = {}  # customer -> (version, promos)
        self.closed = False

    def _check(self) -> None:
        if self.down:
            raise CacheUnavailable("down")

    def flush(self) -> None:
        self.users.clear()
        self.registry = None
        self.complete = self.building = self.lease = None
        self.rebuilt_to = None

    async def read_user(self, user_id: int, now: float) -> CachedUser | None:
        self._check()
        if self.registry is None:
            return None
        if self.complete is None and (self.rebuilt_to is None or user_id > self.rebuilt_to):
            return None
        state = self.users.get(user_id)
        if state is None:
            return CachedUser(self.registry.version, ())
        live = tuple(m.segment_id for m in state.memberships if m.expires_at > now)
        return CachedUser(self.registry.version, live, tuple(state.excluded))

    async def read_users(self, user_ids: Sequence[int], now: float) -> list[CachedUser] | None:
        out = []
        for uid in user_ids:
            one = await self.read_user(uid, now)
            if one is None:
                return None
            out.append(one)
        return out

    async def write_users(self, states: Sequence[UserState]) -> None:
        self._check()
        for s in states:
            cur = self.users.get(s.user_id)
            if cur is None or cur.version < s.version:
                self.users[s.user_id] = s

    async def read_registry(self) -> Registry | None:
        self._check()
        return self.registry

    async def write_registry(self, registry: Registry) -> None:
        self._check()
        if self.registry is None or self.registry.version < registry.version:
            self.registry = registry

    async def begin_rebuild(self, lease_s: float, generation: str | None = None) -> str | None:
        self._check()
        generation = generation or secrets.token_hex(4)
        if self.lease is not None and self.lease != generation:
            return None
        # A mark survives into the next rebuild only while its rebuild's `building` does.
        kept = self.rebuilt_to if self.building is not None else None
        self.lease = self.building = generation
        self.rebuilt_to = kept
        return self.lease

    async def progress_mark(self, user_id: int) -> int | None:
        self._check()
        return None if self.complete is not None else (self.rebuilt_to or 0)

    async def resume_point(self, generation: str) -> int:
        self._check()
        return (self.rebuilt_to or 0) if self.building == generation else 0

    async def mark_rebuilt(self, generation: str, upto_user_id: int) -> bool:
        self._check()
        if self.building != generation:
            return False
        self.rebuilt_to = upto_user_id
        return True

    async def renew_rebuild(self, generation: str, lease_s: float) -> bool:
        self._check()
        return self.lease == generation

    async def release_rebuild(self, generation: str) -> None:
        self._check()
        if self.lease == generation:
            self.lease = None

    async def finish_rebuild(self, generation: str) -> bool:
        self._check()
        if self.building != generation:
            return False
        self.complete, self.building, self.lease = generation, None, None
        self.rebuilt_to = None
        return True

    async def is_complete(self) -> bool:
        self._check()
        return self.complete is not None

    async def invalidate(self) -> None:
        self._check()
        self.complete = self.rebuilt_to = None

    async def versions(self, user_ids: Sequence[int]) -> list[int | None]:
        self._check()
        return [s.version if (s := self.users.get(uid)) else None for uid in user_ids]

    async def record_reconcile(self, found: int, repaired: int, confirmed_at: float | None) -> None:
        self._check()
        self.meta["divergence_found"] = self.meta.get("divergence_found", 0) + found
        self.meta["divergence_repaired"] = self.meta.get("divergence_repaired", 0) + repaired
        if confirmed_at is not None:
            self.meta["synchronized_on"] = confirmed_at

    async def freshness(self) -> dict[str, float]:
        self._check()
        return dict(self.meta)

    async def write_counts(self, counts: Sequence[CustomerCounts]) -> None:
        self._check()
        for c in counts:
            if c.customer_id not in self.counts or self.counts[c.customer_id][0] < c.version:
                self.counts[c.customer_id] = (c.version, len(c.promos))

    async def synced_count(self, customer_id: int, now: float) -> int | None:
        self._check()
        if self.complete is None:
            return None
        return self.counts.get(customer_id, (0, 0))[1]

    async def count_versions(self, customer_ids: Sequence[int]) -> list[int | None]:
        self._check()
        return [self.counts[c][0] if c in self.counts else None for c in customer_ids]

    async def ping(self) -> bool:
        return not self.down

    async def close(self) -> None:
        self.closed = True


class FakeAudienceStore:
    """Audiences in memory, with the real store's log order: a change of an audience
    whose snapshot is being staged in parts waits behind it (Kafka only)."""

    def __init__(self) -> None:
        self.members: dict[AudienceKey, set[int]] = {}
        self.versions: dict[AudienceKey, int] = {}
        # (audience, operation, added, removed, customers after)
        self.history: list[tuple[str, str, int, int, int]] = []
        self.parts: dict[tuple[AudienceKey, str], dict[int, list[int]]] = {}
        self.parts_at: dict[tuple[AudienceKey, str], float] = {}
        # An audience's waiting changes; a snapshot waits as itself, incomplete.
        self.pending: dict[AudienceKey, list[AudienceChange]] = {}
        self.offsets: dict[tuple[str, int], int] = {}
        self.now = 1_000_000.0

    def _info(self, key: AudienceKey) -> AudienceInfo:
        updated = dt.datetime.fromtimestamp(self.now, dt.UTC)
        return AudienceInfo(key, len(self.members[key]), self.versions[key], updated)

    def _apply(self, change: AudienceChange) -> AudienceInfo:
        key = change.key
        current = self.members.setdefault(key, set())
        self.versions.setdefault(key, 0)
        if change.op == "replace":
            added, removed = len(set(change.add)), len(current)
            self.members[key] = set(change.add)
        else:
            add = set(change.add if change.op != "remove" else ()) - current
            gone = set(change.remove if change.op != "add" else ()) & current
            current |= add
            current -= gone
            added, removed = len(add), len(gone)
        self.versions[key] += 1
        self.history.append((str(key), change.op, added, removed, len(self.members[key])))
        return self._info(key)

    def _drain(self, key: AudienceKey) -> int:
        applied = 0
        queue = self.pending.get(key, [])
        while queue:
            head = queue[0]
            if head.is_partial:
                got = self.parts.get((key, head.batch_id or ""), {})
                if len(got) < head.parts:
                    return applied
                del self.parts[(key, head.batch_id or "")]
                ids = sorted({cid for part in got.values() for cid in part})
                head = AudienceChange(
                    key, "replace", add=ids, source=head.source, batch_id=head.batch_id
                )
            self._apply(head)
            queue.pop(0)
            applied += 1
        return applied

    def _in_order(self, change: AudienceChange) -> None:
        key = change.key
        if not self.pending.get(key) and not change.is_partial:
            self._apply(change)
            return
        queue = self.pending.setdefault(key, [])
        if change.is_partial:
            staged = (key, change.batch_id or "")
            if staged not in self.parts:
                queue.append(change)
            self.parts.setdefault(staged, {})[change.part] = list(change.add)
            self.parts_at[staged] = self.now
        else:
            queue.append(change)
        self._drain(key)

    async def apply(self, change: AudienceChange) -> AudienceInfo | None:
        if change.is_partial:
            self._in_order(change)
            return None
        return self._apply(change)

    async def apply_batch(
        self, topic: str, partition: int, changes: Sequence[tuple[int, AudienceChange | None]]
    ) -> int:
        if not changes:
            return 0
        start = self.offsets.get((topic, partition), -1)
        applied = 0
        for offset, change in changes:
            if offset < start:
                continue
            if change is not None:
                self._in_order(change)
                applied += 1
        self.offsets[(topic, partition)] = max(start, changes[-1][0] + 1)
        return applied

    async def next_offsets(self, topic: str) -> dict[int, int]:
        return {p: n for (t, p), n in self.offsets.items() if t == topic}

    async def get(self, key: AudienceKey) -> AudienceInfo | None:
        return self._info(key) if self.versions.get(key) else None

    async def discard_stale_parts(self, older_than_s: float) -> list[StaleSnapshot]:
        stale = []
        for (key, batch_id), got in list(self.parts.items()):
            snapshot = next(c for c in self.pending[key] if c.batch_id == batch_id)
            if self.parts_at[(key, batch_id)] >= self.now - older_than_s:
                continue
            del self.parts[(key, batch_id)]
            self.pending[key].remove(snapshot)
            self._drain(key)
            stale.append(StaleSnapshot(key, batch_id, len(got), snapshot.parts))
        return stale


class NoPromos:
    """A promo store holding no promos: what the reconciler's promo steps read of an
    idle system."""

    async def expired_attempts(self, limit: int) -> list[tuple[str, str]]:
        return []

    async def pending_cleanups(self, limit: int) -> list[Cleanup]:
        return []

    async def counter_outbox(self, min_age_s: float, limit: int) -> list[int]:
        return []

    async def counter_versions(
        self, after_customer_id: int, limit: int, today: dt.date
    ) -> list[tuple[int, int, bool]]:
        return []

    async def counts_of(self, customer_ids: Sequence[int], today: dt.date) -> list[CustomerCounts]:
        return [CustomerCounts(c, 0) for c in customer_ids]

    async def confirm_mirrored(self, counts: Sequence[CustomerCounts]) -> None:
        return None

    async def all_counts(self, today: dt.date, batch: int) -> AsyncIterator[list[CustomerCounts]]:
        return
        yield  # an async generator that yields nothing

    async def active_sync_count(self, customer_id: int, today: dt.date) -> int:
        return 0

    async def get(self, promo_id: str) -> Promo | None:
        return None

    async def claim(self, *args: object, **kwargs: object) -> Claim:
        raise NotImplementedError("NoPromos holds no promos")


class FakeCp:
    """CP in memory: segments by id, members, and the call counts ``CpClient`` keeps."""

    def __init__(self) -> None:
        self.segments: dict[str, set[int]] = {}
        self.calls: dict[str, int] = {"ok": 0, "retry": 0, "failed": 0, "rejected": 0}
        self.closed = False

    async def create_segment(
        self, external_id: str, name: str, expires_at: dt.datetime, *, deadline: float | None
    ) -> str:
        self.calls["ok"] += 1
        self.segments.setdefault(external_id, set())
        return external_id

    async def add_members(
        self,
        segment_id: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        *,
        deadline: float | None,
    ) -> None:
        self.calls["ok"] += 1
        self.segments[segment_id].update(customer_ids)

    async def remove_members(
        self,
        segment_id: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        *,
        deadline: float | None,
    ) -> None:
        self.calls["ok"] += 1
        self.segments[segment_id].difference_update(customer_ids)

    async def delete_segment(self, segment_id: str, *, deadline: float | None) -> None:
        self.calls["ok"] += 1
        self.segments.pop(segment_id, None)

    async def close(self) -> None:
        self.closed = True


class FakeFigures:
    """``StoreFigures`` of a ``FakeStore``."""

    def __init__(self, store: FakeStore) -> None:
        self._store = store
        self.backlog_read = asyncio.Event()  # set once gauges have read the outbox

    async def count_users(self) -> int:
        return len(self._store.versions)

    async def outbox_backlog(self) -> dict[str, tuple[int, float]]:
        self.backlog_read.set()
        rows = self._store.outbox
        age = self._store.now - min((at for _, at in rows), default=self._store.now)
        return {"cache": (len(rows), age), "counter": (0, 0.0)}

    def pool_counts(self) -> dict[str, int]:
        names = ("acquire_timeouts", "conflict", "locked", "turn_timeout")
        gauges = ("in_use", "in_use_peak", "waiting", "max_size")
        return dict.fromkeys(names + gauges, 0)
