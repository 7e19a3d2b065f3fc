"""In-memory fakes of the domain's ports, for fast unit tests of the service layer.

They follow the same contracts as the real adapters (versioned cache writes, the
completeness marker, atomic changes), which the integration tests check on the real
servers.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator, Sequence

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


class FakeStore:
    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}
        self.deleted: set[int] = set()
        self.seg_version: dict[int, int] = {}
        self.members: dict[int, dict[int, float | None]] = {}
        self.excluded: dict[int, set[int]] = {}
        self.versions: dict[int, int] = {}
        self.history: list[tuple[int, str, str, float]] = []
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
        return AppliedChange(await self.user_state(uid), (await self.registry()).version)

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

    async def user_states(self, batch_size: int) -> AsyncIterator[list[UserState]]:
        uids = sorted(u for u in self.versions if self.members.get(u) or self.excluded.get(u))
        for i in range(0, len(uids), batch_size):
            yield [await self.user_state(u) for u in uids[i : i + batch_size]]


class FakeCache:
    def __init__(self) -> None:
        self.users: dict[int, UserState] = {}
        self.registry: Registry | None = None
        self.complete: str | None = None
        self.building: str | None = None
        self.lease: str | None = None
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise CacheUnavailable("down")

    def flush(self) -> None:
        self.users.clear()
        self.registry = None
        self.complete = self.building = self.lease = None

    async def read_user(self, user_id: int, now: float) -> CachedUser | None:
        self._check()
        if self.complete is None or self.registry is None:
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

    async def begin_rebuild(self, lease_s: float) -> str | None:
        self._check()
        if self.lease is not None:
            return None
        self.lease = self.building = secrets.token_hex(4)
        return self.lease

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
        return True

    async def is_complete(self) -> bool:
        self._check()
        return self.complete is not None

    async def invalidate(self) -> None:
        self._check()
        self.complete = None
