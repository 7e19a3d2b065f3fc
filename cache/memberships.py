"""Users' memberships and the segment registry: the hot reads and the write-through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import orjson
from redis import exceptions as redis_errors

from cache import keys
from cache.base import CacheBase, _guard, _text
from cache.scripts import READ as _READ
from service.domain.errors import CacheUnavailable
from service.domain.model import NEVER, CachedUser, Registry, RegistryEntry, UserState

T = TypeVar("T")

# Keys of users with nothing to expire by themselves are kept at least this long, so
# their version outlives any slow writer holding an older state.
MIN_KEY_TTL_S = 600

# Users per write call: large enough that the per-call overhead vanishes, small enough
# that one call (about 5 us of Redis time a user) never holds Redis for long.
_USERS_PER_CALL = 100
# Users a bulk write keeps in flight on the pipelined connection (two slices at most:
# ~16 ms of Redis time, far below the read timeout that every reply must beat).
_USERS_PER_SLICE = 1000


def _cached_user(registry_version: int, items: Sequence[bytes]) -> CachedUser:
    try:
        # Most users left no percentage segment: every item is a segment id, and one
        # map() over them is the cheapest way to say so.
        return CachedUser(registry_version, tuple(map(int, items)), ())
    except ValueError:  # an "x<id>" item: int() refuses it
        pass
    members: list[int] = []
    excluded: list[int] = []
    for item in items:
        if item[:1] == b"x":
            excluded.append(int(item[1:]))
        else:
            members.append(int(item))
    return CachedUser(registry_version, tuple(members), tuple(excluded))


def _user_args(state: UserState, now: float, out: list[Any]) -> None:
    """Append one user's arguments for _WRITE_USERS to ``out``."""
    # Scores go as floats (inf for no expiry): both clients' encoders write them as
    # Redis reads them, and repr() here was most of this function's time with expiries.
    # A rebuild runs this for every user.
    pairs: list[Any] = [-state.version, "v"]
    latest = 0.0
    for m in state.memberships:
        expires_at = m.expires_at
        pairs += (expires_at, m.segment_id)
        if expires_at > latest:
            latest = expires_at
    for sid in state.excluded:
        pairs += (NEVER, f"x{sid}")
        latest = NEVER
    expire_at = 0 if latest == NEVER else int(max(latest, now + MIN_KEY_TTL_S) * 1000)
    out += [expire_at, len(pairs), *pairs]


def _by_bucket(items: Iterable[T], user_id: Callable[[T], int]) -> dict[str, list[T]]:
    """Items grouped by the meta key of their user's bucket, in first-seen order."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(keys.meta_of(user_id(item)), []).append(item)
    return groups


def _write_calls(
    states: Sequence[UserState], now: float, per_call: int
) -> list[tuple[list[str], list[Any]]]:
    """(keys, args) of _WRITE_USERS calls, ``per_call`` users each."""
    calls = []
    for i in range(0, len(states), per_call):
        call_keys: list[str] = []
        args: list[Any] = []
        for state in states[i : i + per_call]:
            call_keys.append(keys.user(state.user_id))
            _user_args(state, now, args)
        calls.append((call_keys, args))
    return calls


class Memberships(CacheBase):
    """Reads and writes of users' memberships and of the segment registry."""

    async def read_user(self, user_id: int, now: float) -> CachedUser | None:
        # The hot path: plain try/except rather than the _guard() context manager,
        # whose generator machinery showed up in profiles of a request.
        read_keys = [keys.meta_of(user_id), keys.user(user_id)]
        args: list[str | int] = [f"({now!r}", user_id]
        try:
            if self._fast is None:
                raw = await self._call(self._read, read_keys, args)
            else:
                try:
                    raw = await self._fast.evalsha(self._read.sha, read_keys, args)
                except redis_errors.NoScriptError:
                    # A restarted server forgot its scripts: load and ask again.
                    await self._r.script_load(_READ)
                    raw = await self._fast.evalsha(self._read.sha, read_keys, args)
        except self._errors as exc:
            raise CacheUnavailable(str(exc) or type(exc).__name__) from exc
        if raw is None:
            return None
        return _cached_user(int(raw[0]), raw[1:])

    async def read_users(self, user_ids: Sequence[int], now: float) -> list[CachedUser] | None:
        """Many users in one script call (on a cluster, one per bucket, sent
        concurrently); None when any of their buckets is incomplete."""
        low = f"({now!r}"
        by_bucket = _by_bucket(user_ids, lambda uid: uid)
        if self._cluster:
            groups = list(by_bucket.items())
            calls = [((meta, *map(keys.user, ids)), (low, 1, max(ids))) for meta, ids in groups]
        else:
            groups = [("", [uid for ids in by_bucket.values() for uid in ids])]
            highest = max(user_ids, default=0)
            calls = [((*by_bucket, *map(keys.user, groups[0][1])), (low, len(by_bucket), highest))]
        async with _guard(self._errors):
            replies = await self._script_calls(self._read_many, calls)
        found: dict[int, CachedUser] = {}
        for (_, ids), raw in zip(groups, replies, strict=True):
            if raw is None:
                return None
            version = int(raw[0])
            for uid, items in zip(ids, raw[1:], strict=True):
                found[uid] = _cached_user(version, items)
        return [found[uid] for uid in user_ids]

    async def read_registry(self) -> Registry | None:
        async with _guard(self._errors):
            version, flat = await self._call(self._read_registry, [keys.META, keys.REGISTRY])
        if version is None:
            return None
        segments = {}
        for sid, raw in zip(flat[::2], flat[1::2], strict=True):
            entry = orjson.loads(raw)
            segments[int(sid)] = RegistryEntry(entry["slug"], entry.get("auto_bp"))
        return Registry(int(version), segments)

    async def is_complete(self) -> bool:
        """Is the copy complete?  A Redis that restarted from its own persistence files
        (if an operator enabled them) may have lost the last writes yet still hold the
        marker; a cluster shard may have restarted on its own.  The marker names the
        server runs that completed it, and any new run drops it, so the copy is
        rebuilt."""
        async with _guard(self._errors):
            complete, run_ids, building_runs = await self._r.hmget(
                keys.META, ["complete", "run_id", "building_runs"]
            )
            if complete is None:
                # Likewise a rebuild under way on a server that restarted since it began
                # (its `building` and marks restored from the files): it must mark no
                # more, and no later rebuild may resume from its marks.
                if building_runs is not None and _text(building_runs) != await self._run_ids():
                    await self._on_every_meta("HDEL", "building", "building_runs", "rebuilt_to")
                return False
            if run_ids is not None and _text(run_ids) != await self._run_ids():
                await self.invalidate()
                return False
            return True

    async def write_users(self, states: Sequence[UserState]) -> None:
        if not states:
            return
        now = time.time()
        async with _guard(self._errors):
            # Through the pipelined connection: its packing costs a fraction of a
            # redis-py call (bench/redis_clients.py).  A
            # server that forgot its scripts (restarted) is written through redis-py,
            # which loads them.
            if self._fast is not None and await self._write_fast(states, now):
                return
            if self._cluster:
                # One call per bucket: a script's keys must share a slot.
                by_bucket = _by_bucket(states, lambda state: state.user_id)
                calls = [
                    call
                    for group in by_bucket.values()
                    for call in _write_calls(group, now, _USERS_PER_CALL)
                ]
            else:
                calls = _write_calls(states, now, _USERS_PER_CALL)
            for i in range(0, len(calls), 100):
                await self._script_calls(self._write_users, calls[i : i + 100])

    async def _write_fast(self, states: Sequence[UserState], now: float) -> bool:
        """Write ``states`` through the pipelined connection, one slice of users in
        flight while the next is packed, so that neither Redis nor Python waits for the
        other, and no reply waits behind so many others that it outlasts the read
        timeout.  False when the server does not know the script."""
        assert self._fast is not None
        sha = self._write_users.sha
        # A write-through (one call, nothing to overlap) skips the gathers, whose
        # machinery nearly doubled the CPU of a single write.
        if len(states) <= _USERS_PER_CALL:
            ((call_keys, args),) = _write_calls(states, now, _USERS_PER_CALL)
            try:
                await self._fast.evalsha(sha, call_keys, args)
            except redis_errors.NoScriptError:
                return False
            return True
        in_flight: list[asyncio.Future[Any]] = []
        try:
            for i in range(0, len(states), _USERS_PER_SLICE):
                sent = [
                    self._fast.evalsha(sha, call_keys, args)
                    for call_keys, args in _write_calls(
                        states[i : i + _USERS_PER_SLICE], now, _USERS_PER_CALL
                    )
                ]
                previous, in_flight = in_flight, sent
                await asyncio.gather(*previous)
            await asyncio.gather(*in_flight)
            return True
        except redis_errors.NoScriptError:
            return False
        finally:
            # Replies of a slice not awaited after a failure: retrieve, do not raise.
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def write_registry(self, registry: Registry) -> None:
        args: list[Any] = [registry.version]
        for sid, entry in registry.segments.items():
            args += [sid, orjson.dumps({"slug": entry.slug, "auto_bp": entry.auto_bp})]
        async with _guard(self._errors):
            await self._call(self._write_registry, [keys.META, keys.REGISTRY], args)
            # Then every bucket, which is what reads see.  Unconditionally: on a
            # cluster a restarted shard may have lost its buckets but not the registry.
            await self._each_bucket(self._bump_registry, [registry.version])

    async def invalidate(self) -> None:
        async with _guard(self._errors):
            await self._on_every_meta("HDEL", "complete", "rebuilt_to")
