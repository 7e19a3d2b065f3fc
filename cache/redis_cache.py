"""The Redis (Valkey) serving copy.  The key schema is documented in docs/cache-format.md.

Every read is one round trip: a Lua script checks the completeness marker and
returns the user's unexpired memberships with the registry version, so a flushed or
restarted Redis is noticed on the very next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import redis.asyncio as redis
from redis import exceptions as redis_errors

from cache import keys
from cache.pipelined import PipelinedPool
from service.domain.errors import CacheUnavailable
from service.domain.model import NEVER, CachedUser, Registry, RegistryEntry, UserState

# Keys of users with nothing to expire by themselves are kept at least this long, so
# their version outlives any slow writer holding an older state.
MIN_KEY_TTL_S = 600

_READ = """
local complete, registry = unpack(redis.call('HMGET', KEYS[1], 'complete', 'registry'))
if not complete or not registry then return false end
local out = redis.call('ZRANGE', KEYS[2], ARGV[1], '+inf', 'BYSCORE')
table.insert(out, 1, registry)
return out
"""

# KEYS: meta, then user keys.  One call for a whole batch (a standalone or Sentinel
# layout; on Redis Cluster the keys would have to be grouped by slot).
_READ_MANY = """
local complete, registry = unpack(redis.call('HMGET', KEYS[1], 'complete', 'registry'))
if not complete or not registry then return false end
local out = {registry}
for i = 2, #KEYS do
  out[i] = redis.call('ZRANGE', KEYS[i], ARGV[1], '+inf', 'BYSCORE')
end
return out
"""

_COUNT_SYNCED = """
if not redis.call('HGET', KEYS[1], 'complete') then return false end
return redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf')
"""

# ARGV: version, pexpireat-ms (0: persist), then score/member pairs.
_WRITE_USER = """
local cur = redis.call('ZSCORE', KEYS[1], 'v')
if cur and -tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[1], -tonumber(ARGV[1]), 'v')
for i = 3, #ARGV, 1000 do
  redis.call('ZADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if ARGV[2] ~= '0' then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: meta, registry.  ARGV: version, then id/entry pairs.
_WRITE_REGISTRY = """
local cur = redis.call('HGET', KEYS[1], 'registry')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[2])
for i = 2, #ARGV, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'registry', ARGV[1])
return 1
"""

# KEYS: meta, lease.  ARGV: generation, the server's run_id.
_FINISH_REBUILD = """
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'complete', ARGV[1], 'run_id', ARGV[2])
redis.call('HDEL', KEYS[1], 'building')
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: lease.  ARGV: generation, lease-ms.
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
    TimeoutError,
)


@contextlib.asynccontextmanager
async def _guard() -> AsyncIterator[None]:
    try:
        yield
    except _ERRORS as exc:
        raise CacheUnavailable(str(exc) or type(exc).__name__) from exc


def _score(expires_at: float) -> str:
    return "+inf" if expires_at == NEVER else repr(expires_at)


def _cached_user(registry_version: int, items: Sequence[bytes]) -> CachedUser:
    members: list[int] = []
    excluded: list[int] = []
    for item in items:
        if item[:1] == b"x":
            excluded.append(int(item[1:]))
        else:
            members.append(int(item))
    return CachedUser(registry_version, tuple(members), tuple(excluded))


def _user_args(state: UserState, now: float) -> list[Any]:
    args: list[Any] = [state.version, 0]
    latest = 0.0
    for m in state.memberships:
        args += [_score(m.expires_at), m.segment_id]
        latest = max(latest, m.expires_at)
    for sid in state.excluded:
        args += ["+inf", f"x{sid}"]
        latest = NEVER
    if latest != NEVER:
        args[1] = int(max(latest, now + MIN_KEY_TTL_S) * 1000)
    return args


class RedisCache:
    """The serving copy.  ``fast``, when given, carries the hot per-user read (see
    cache/pipelined.py for why); everything else goes through redis-py."""

    def __init__(self, client: redis.Redis, fast: PipelinedPool | None = None) -> None:
        self._r = client
        self._fast = fast
        self._read = client.register_script(_READ)
        self._write_user = client.register_script(_WRITE_USER)
        self._write_registry = client.register_script(_WRITE_REGISTRY)
        self._finish = client.register_script(_FINISH_REBUILD)
        self._renew = client.register_script(_RENEW_LEASE)
        self._count_synced = client.register_script(_COUNT_SYNCED)
        self._read_many = client.register_script(_READ_MANY)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        pool_size: int = 64,
        pipelined_reads: bool = True,
    ) -> RedisCache:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=pool_size,
            # Fail fast: the caller falls back to PostgreSQL instead of retrying here.
            retry_on_timeout=False,
        )
        fast = PipelinedPool(url, timeout_s=timeout_s) if pipelined_reads else None
        return cls(client, fast)

    async def start(self) -> None:
        """Open the pipelined read connection.  A Redis that is down now is not an
        error: reads fall back to PostgreSQL and the pool reconnects by itself."""
        if self._fast is not None:
            with contextlib.suppress(redis_errors.ConnectionError, redis_errors.TimeoutError):
                await self._fast.connect()

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        await self._r.aclose()

    async def ping(self) -> bool:
        try:
            async with _guard():
                return bool(await self._r.ping())
        except CacheUnavailable:
            return False

    # -- reads ----------------------------------------------------------------

    async def read_user(self, user_id: int, now: float) -> CachedUser | None:
        # The hot path: plain try/except rather than the _guard() context manager,
        # whose generator machinery showed up at ~2% of a request in py-spy.
        read_keys = [keys.META, keys.user(user_id)]
        args = [f"({now!r}"]
        try:
            if self._fast is None:
                raw = await self._read(keys=read_keys, args=args)
            else:
                try:
                    raw = await self._fast.evalsha(self._read.sha, read_keys, args)
                except redis_errors.NoScriptError:
                    # A restarted server forgot its scripts: load and ask again.
                    await self._r.script_load(_READ)
                    raw = await self._fast.evalsha(self._read.sha, read_keys, args)
        except _ERRORS as exc:
            raise CacheUnavailable(str(exc) or type(exc).__name__) from exc
        if raw is None:
            return None
        return _cached_user(int(raw[0]), raw[1:])

    async def read_users(self, user_ids: Sequence[int], now: float) -> list[CachedUser] | None:
        """Many users in one round trip; None when the cache is not complete."""
        async with _guard():
            raw = await self._read_many(
                keys=[keys.META, *(keys.user(uid) for uid in user_ids)], args=[f"({now!r}"]
            )
        if raw is None:
            return None
        version = int(raw[0])
        return [_cached_user(version, items) for items in raw[1:]]

    async def read_registry(self) -> Registry | None:
        async with _guard(), self._r.pipeline(transaction=True) as pipe:
            pipe.hget(keys.META, "registry")
            pipe.hgetall(keys.REGISTRY)
            version, entries = await pipe.execute()
        if version is None:
            return None
        segments = {}
        for sid, raw in entries.items():
            entry = orjson.loads(raw)
            segments[int(sid)] = RegistryEntry(entry["slug"], entry.get("auto_bp"))
        return Registry(int(version), segments)

    async def is_complete(self) -> bool:
        """Is the copy complete?  A Redis that restarted from its own persistence files
        (if an operator enabled them) may have lost the last writes yet still hold the
        marker: the marker names the server run that completed it, and a new run drops
        it, so the copy is rebuilt."""
        async with _guard():
            complete, run_id = await self._r.hmget(keys.META, ["complete", "run_id"])
            if complete is None:
                return False
            if isinstance(run_id, bytes):  # bytes unless the client decodes responses
                run_id = run_id.decode()
            if run_id is not None and run_id != await self._run_id():
                await self._r.hdel(keys.META, "complete")
                return False
            return True

    # -- writes ---------------------------------------------------------------

    async def write_users(self, states: Sequence[UserState]) -> None:
        if not states:
            return
        now = time.time()
        async with _guard():
            if self._fast is not None:
                # Through the pipelined connection: its packing costs a fraction of a
                # redis-py call (bench/redis_clients.py: 3.7-4.5x the throughput).
                # Bulk writes go in slices, so that no reply waits behind so many
                # others that it outlasts the read timeout.
                sha = self._write_user.sha
                try:
                    for i in range(0, len(states), 500):
                        await asyncio.gather(
                            *(
                                self._fast.evalsha(sha, [keys.user(s.user_id)], _user_args(s, now))
                                for s in states[i : i + 500]
                            )
                        )
                    return
                except redis_errors.NoScriptError:
                    # A restarted server forgot its scripts: fall through to redis-py,
                    # which loads them.
                    pass
            async with self._r.pipeline(transaction=False) as pipe:
                for state in states:
                    await self._write_user(
                        keys=[keys.user(state.user_id)], args=_user_args(state, now), client=pipe
                    )
                await pipe.execute()

    async def write_registry(self, registry: Registry) -> None:
        args: list[Any] = [registry.version]
        for sid, entry in registry.segments.items():
            args += [sid, orjson.dumps({"slug": entry.slug, "auto_bp": entry.auto_bp})]
        async with _guard():
            await self._write_registry(keys=[keys.META, keys.REGISTRY], args=args)

    async def invalidate(self) -> None:
        async with _guard():
            await self._r.hdel(keys.META, "complete")

    # -- rebuild --------------------------------------------------------------

    async def begin_rebuild(self, lease_s: float) -> str | None:
        generation = secrets.token_hex(8)
        async with _guard():
            if not await self._r.set(
                keys.REBUILD_LEASE, generation, nx=True, px=int(lease_s * 1000)
            ):
                return None
            # `building` lives in the meta hash, so a FLUSHALL during the rebuild
            # erases it and the rebuild cannot mark an incomplete copy as complete.
            await self._r.hset(keys.META, "building", generation)
        return generation

    async def renew_rebuild(self, generation: str, lease_s: float) -> bool:
        async with _guard():
            return bool(
                await self._renew(keys=[keys.REBUILD_LEASE], args=[generation, int(lease_s * 1000)])
            )

    async def finish_rebuild(self, generation: str) -> bool:
        async with _guard():
            run_id = await self._run_id()
            return bool(
                await self._finish(keys=[keys.META, keys.REBUILD_LEASE], args=[generation, run_id])
            )

    async def _run_id(self) -> str:
        info = await self._r.info("server")
        return str(info["run_id"])

    # -- sync counters --------------------------------------------------------
    # The mirror only grows (ZADD is idempotent) and entries stop counting when their
    # end passes, so writers need no versions; keys expire with their last promo.

    async def add_synced(self, customer_ids: Sequence[int], promo_id: str, until: float) -> None:
        await self.write_ledger([(cid, promo_id, until) for cid in customer_ids])

    async def write_ledger(self, rows: Sequence[tuple[int, str, float]]) -> None:
        async with _guard():
            for start in range(0, len(rows), 10_000):
                async with self._r.pipeline(transaction=False) as pipe:
                    for cid, promo, until in rows[start : start + 10_000]:
                        key = keys.synced(cid)
                        pipe.zadd(key, {promo: until})
                        # GT: a key's expiry only moves later, to its last promo's end.
                        pipe.pexpireat(key, int(until * 1000), gt=True)
                        pipe.pexpireat(key, int(until * 1000), nx=True)
                    await pipe.execute()

    async def synced_count(self, customer_id: int, now: float) -> int | None:
        async with _guard():
            count = await self._count_synced(
                keys=[keys.META, keys.synced(customer_id)], args=[f"({now!r}"]
            )
        return None if count is None else int(count)

    # -- reconciliation -------------------------------------------------------

    async def versions(self, user_ids: Sequence[int]) -> list[int | None]:
        """The version each user's key holds (None: no key)."""
        async with _guard(), self._r.pipeline(transaction=False) as pipe:
            for uid in user_ids:
                pipe.zscore(keys.user(uid), "v")
            scores = await pipe.execute()
        return [None if s is None else int(-s) for s in scores]

    async def record_reconcile(self, found: int, repaired: int, confirmed_at: float | None) -> None:
        """Divergence counters and the last time the copy was confirmed consistent
        (LaunchDarkly's ``synchronized_on``), kept in the meta hash for every process."""
        async with _guard(), self._r.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.META, "divergence_found", found)
            pipe.hincrby(keys.META, "divergence_repaired", repaired)
            if confirmed_at is not None:
                pipe.hset(keys.META, "synchronized_on", repr(confirmed_at))
            await pipe.execute()

    async def freshness(self) -> dict[str, float]:
        async with _guard():
            raw = await self._r.hmget(
                keys.META, ["synchronized_on", "divergence_found", "divergence_repaired"]
            )
        names = ("synchronized_on", "divergence_found", "divergence_repaired")
        return {n: float(v) for n, v in zip(names, raw, strict=True) if v is not None}
