"""The Redis (Valkey) serving copy.  The key schema is documented in docs/cache-format.md.

Every read is one round trip: a Lua script checks the completeness marker (or, while a
rebuild runs, its progress mark) and returns the user's unexpired memberships with the
registry version, so a flushed or restarted Redis is noticed on the very next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from cache import keys
from cache.pipelined import PipelinedPool, unsupported_url
from service.domain.errors import CacheUnavailable
from service.domain.model import NEVER, CachedUser, Registry, RegistryEntry, UserState
from service.domain.promos import CustomerCounts, end_of_day

T = TypeVar("T")

log = logging.getLogger(__name__)

# Keys of users with nothing to expire by themselves are kept at least this long, so
# their version outlives any slow writer holding an older state.
MIN_KEY_TTL_S = 600

# KEYS: the user's bucket meta, the user.  ARGV: the lowest live score, the user id.
# While a rebuild is under way, a user at or below its `rebuilt_to` mark is answered
# too: the rebuild has written that user since the bucket was last emptied.
_READ = """
local complete, registry, upto = unpack(
  redis.call('HMGET', KEYS[1], 'complete', 'registry', 'rebuilt_to'))
if not registry then return false end
if not complete and not (upto and tonumber(ARGV[2]) <= tonumber(upto)) then return false end
local out = redis.call('ZRANGE', KEYS[2], ARGV[1], '+inf', 'BYSCORE')
table.insert(out, 1, registry)
return out
"""

# KEYS: ARGV[2] bucket metas, then user keys.  ARGV: the lowest live score, the number
# of metas, the highest user id asked.  Answers the newest registry version among the
# buckets, then one list per user.  Standalone: one call for a whole batch; Redis
# Cluster: one call per bucket.
_READ_MANY = """
local metas = tonumber(ARGV[2])
local highest = tonumber(ARGV[3])
local newest = 0
for i = 1, metas do
  local complete, registry, upto = unpack(
    redis.call('HMGET', KEYS[i], 'complete', 'registry', 'rebuilt_to'))
  if not registry then return false end
  if not complete and not (upto and highest <= tonumber(upto)) then return false end
  newest = math.max(newest, tonumber(registry))
end
local out = {newest}
for i = metas + 1, #KEYS do
  out[i - metas + 1] = redis.call('ZRANGE', KEYS[i], ARGV[1], '+inf', 'BYSCORE')
end
return out
"""

# KEYS: the customer's bucket meta, the customer's key.
# KEYS[1]: a customer's count key.  ARGV: version, pexpireat-ms, then promo/end pairs.
_WRITE_COUNTS = """
local v = redis.call('ZSCORE', KEYS[1], '#v')
if v and -tonumber(v) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[1], -tonumber(ARGV[1]), '#v')
for i = 3, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""

# A count key with no active promo keeps its version this long, so that a late write of
# an older state still finds it and loses.
_EMPTY_COUNTS_TTL_S = 86_400

_COUNT_SYNCED = """
if not redis.call('HGET', KEYS[1], 'complete') then return false end
return redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf')
"""

# KEYS: users (one slot on a cluster).  ARGV, per user: pexpireat-ms (0: persist), the
# number n of ZADD arguments, then those n: first -version/"v", then the memberships'
# score/member pairs.  A user's set is replaced only by a newer version.  Many users a
# call: one call per user cost a cache rebuild more in call overhead (a future, a timer,
# a reply each) than the writes themselves.  The version goes in the same ZADD as the
# memberships and DEL only runs for an existing key: Valkey's own time in a rebuild
# (flushed cache, 100k users x 5) fell from 14-19 us to 9-12 us a user.
_WRITE_USERS = """
local a = 1
for i = 1, #KEYS do
  local expire_at = ARGV[a]
  local first = a + 2
  local last = a + 1 + tonumber(ARGV[a + 1])
  local cur = redis.call('ZSCORE', KEYS[i], 'v')
  if not cur or tonumber(cur) > tonumber(ARGV[first]) then
    if cur then redis.call('DEL', KEYS[i]) end
    for j = first, last, 1000 do
      redis.call('ZADD', KEYS[i], unpack(ARGV, j, math.min(j + 999, last)))
    end
    if expire_at ~= '0' then redis.call('PEXPIREAT', KEYS[i], expire_at) end
  end
  a = last + 1
end
return 1
"""

# KEYS: user keys.  The version each holds (its 'v' score, negated), false for no key.
_VERSIONS = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZSCORE', KEYS[i], 'v')
end
return out
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

# KEYS: meta, registry.  The version and the entries, read atomically.
_READ_REGISTRY = """
return {redis.call('HGET', KEYS[1], 'registry'), redis.call('HGETALL', KEYS[2])}
"""

# KEYS: a bucket meta.  ARGV: registry version.  Only ever moves forward.
_BUMP_REGISTRY = """
local cur = redis.call('HGET', KEYS[1], 'registry')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'registry', ARGV[1])
return 1
"""

# KEYS: a bucket meta.  ARGV: generation.  A bucket whose shard was flushed or
# restarted since begin_rebuild has lost `building` and stays incomplete.
_MARK_BUCKET = """
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'complete', ARGV[1])
redis.call('HDEL', KEYS[1], 'building', 'rebuilt_to')
return 1
"""

# KEYS: a bucket meta.  ARGV: generation, the highest user id written so far.  Only
# while the bucket still holds this rebuild's `building`: after a flush the users
# written before it are gone, so the mark must not come back.
_MARK_PROGRESS = """
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'rebuilt_to', ARGV[2])
return 1
"""

# KEYS: meta, lease.  ARGV: generation, the servers' run ids, '1' to mark complete
# (else only end the rebuild: some bucket was lost on the way).
_FINISH_REBUILD = """
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'complete', ARGV[1], 'run_id', ARGV[2])
end
redis.call('HDEL', KEYS[1], 'building')
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return tonumber(ARGV[3])
"""

# KEYS: lease.  ARGV: generation, lease-ms.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    # Redis Cluster: a shard down or its slots moving while the client catches up.
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.TryAgainError,
    OSError,
    TimeoutError,
)


# redis-py's asyncio cluster client can fail with AttributeError while a shard
# restarts (a connection's writer torn down under a concurrent call: seen in
# tests/cluster; redis/redis-py#3835 and #3815 are the same family).  On a cluster only,
# those count as "Redis unavailable" so the read falls back to PostgreSQL.
_CLUSTER_CLIENT_FAULTS = (AttributeError,)


@contextlib.asynccontextmanager
async def _guard(errors: tuple[type[BaseException], ...] = _ERRORS) -> AsyncIterator[None]:
    try:
        yield
    except errors as exc:
        raise CacheUnavailable(str(exc) or type(exc).__name__) from exc


def _cached_user(registry_version: int, items: Sequence[bytes]) -> CachedUser:
    try:
        # Most users left no percentage segment: every item is a segment id
        # (in-process, 64 reads in flight: 13.7 -> 12.9-13.5 us a read through the door).
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
    # Redis reads them, and repr() here took 80% of this function with expiries.  A
    # rebuild runs this for every user.
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


Client = redis.Redis | RedisCluster

# Users per write call: large enough that the per-call overhead vanishes, small enough
# that one call (about 5 us of Redis time a user) never holds Redis for long.
_USERS_PER_CALL = 100
# Users a bulk write keeps in flight on the pipelined connection (two slices at most:
# ~16 ms of Redis time, far below the read timeout that every reply must beat).
_USERS_PER_SLICE = 1000

# Extra connections (per shard on a cluster) beyond the script calls in flight, for the
# few plain commands (markers, lease, reconciler figures) that take no permit.
_SPARE_CONNECTIONS = 16


class RedisCache:
    """The serving copy, on a standalone (or Sentinel) Redis or on a Redis Cluster.

    ``fast``, when given, carries the hot per-user read and user writes (see
    cache/pipelined.py for why); everything else goes through redis-py, whose cluster
    client routes each key to its shard."""

    def __init__(
        self, client: Client, fast: PipelinedPool | None = None, pool_size: int = 64
    ) -> None:
        self._r = client
        self._cluster = isinstance(client, RedisCluster)
        # redis-py's pools fail a call at once when all their connections are busy
        # (MaxConnectionsError: CI saw it on the cluster when a rebuild's concurrent
        # bucket calls met a test's reads), and the reader would go to PostgreSQL.
        # Script calls therefore wait for one of ``pool_size`` permits, the pools hold
        # a few connections more, and a bulk operation takes at most half the permits,
        # so reads keep moving during a rebuild.  (redis-py's BlockingConnectionPool
        # would wait too, on a standalone server only, and cost 10% of the batch-read
        # throughput: 208k -> 180k lookups/s in-process.)
        self._in_flight = asyncio.Semaphore(pool_size)
        self._bulk_width = max(1, pool_size // 2)
        self._errors = _ERRORS + _CLUSTER_CLIENT_FAULTS if self._cluster else _ERRORS
        self._fast = fast
        self._read = client.register_script(_READ)
        self._write_users = client.register_script(_WRITE_USERS)
        self._write_registry = client.register_script(_WRITE_REGISTRY)
        self._read_registry = client.register_script(_READ_REGISTRY)
        self._bump_registry = client.register_script(_BUMP_REGISTRY)
        self._mark_bucket = client.register_script(_MARK_BUCKET)
        self._mark_progress = client.register_script(_MARK_PROGRESS)
        self._finish = client.register_script(_FINISH_REBUILD)
        self._renew = client.register_script(_RENEW_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)
        self._count_synced = client.register_script(_COUNT_SYNCED)
        self._write_counts = client.register_script(_WRITE_COUNTS)
        self._read_many = client.register_script(_READ_MANY)
        self._versions = client.register_script(_VERSIONS)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        pool_size: int = 64,
        pipelined_reads: bool = True,
        cluster: bool = False,
    ) -> RedisCache:
        if cluster:
            # The pipelined client speaks to one server; on a cluster every call goes
            # through redis-py, which follows the slot map (and MOVED/ASK redirects).
            return cls(
                RedisCluster.from_url(
                    url,
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                    max_connections=pool_size + _SPARE_CONNECTIONS,
                ),
                pool_size=pool_size,
            )
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=pool_size + _SPARE_CONNECTIONS,
            # Fail fast: the caller falls back to PostgreSQL instead of retrying here.
            retry_on_timeout=False,
        )
        fast = None
        if pipelined_reads:
            # Only plain redis:// over TCP: for TLS, unix sockets or URL options every
            # call goes through redis-py, which understands them (cache/pipelined.py).
            reason = unsupported_url(url)
            if reason is None:
                fast = PipelinedPool(url, timeout_s=timeout_s)
            else:
                log.warning("hot reads go through redis-py instead: %s", reason)
        return cls(client, fast, pool_size)

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
            async with _guard(self._errors):
                return bool(await self._r.ping())
        except CacheUnavailable:
            return False

    async def _call(
        self, script: AsyncScript, call_keys: Sequence[str], call_args: Sequence[Any] = ()
    ) -> Any:
        """Run a script by its hash; a server that forgot it (restarted) gets the text
        through EVAL, which also caches it there.  (redis-py's own reload sends SCRIPT
        LOAD to every master of a cluster, which failed while one was restarting.)"""
        async with self._in_flight:
            try:
                return await self._r.evalsha(script.sha, len(call_keys), *call_keys, *call_args)
            except redis_errors.NoScriptError:
                text = cast(str, script.script)  # registered from our own str constants
                return await self._r.eval(text, len(call_keys), *call_keys, *call_args)

    async def _script_calls(
        self, script: AsyncScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """One script over many key sets, pipelined.  A server that forgot its scripts
        (restarted) gets them loaded, then the calls are sent once more: they are
        idempotent.  redis-py refuses scripts in cluster pipelines, so on a cluster the
        calls go concurrently instead, each routed to its slot's shard."""
        if self._cluster:
            limit = asyncio.Semaphore(self._bulk_width)

            async def call(call_keys: Sequence[str], call_args: Sequence[Any]) -> Any:
                async with limit:
                    return await self._call(script, call_keys, call_args)

            return list(await asyncio.gather(*(call(k, a) for k, a in calls)))
        for attempt in (1, 2):
            try:
                async with self._in_flight, self._r.pipeline(transaction=False) as pipe:
                    for call_keys, call_args in calls:
                        pipe.evalsha(script.sha, len(call_keys), *call_keys, *call_args)
                    return list(await pipe.execute())
            except redis_errors.NoScriptError:
                if attempt == 2:
                    raise
                await self._r.script_load(script.script)
        raise AssertionError("unreachable")

    async def _each_bucket(self, script: AsyncScript, args: Sequence[Any]) -> list[Any]:
        return await self._script_calls(script, [((meta,), args) for meta in keys.BUCKET_METAS])

    async def _on_every_meta(self, command: str, *args: Any) -> None:
        """One single-key hash command on the global meta and every bucket meta, in one
        pipeline (per shard on a cluster)."""
        async with self._r.pipeline(transaction=False) as pipe:
            for meta in (keys.META, *keys.BUCKET_METAS):
                pipe.execute_command(command, meta, *args)
            await pipe.execute()

    # -- reads ----------------------------------------------------------------

    async def read_user(self, user_id: int, now: float) -> CachedUser | None:
        # The hot path: plain try/except rather than the _guard() context manager,
        # whose generator machinery showed up at ~2% of a request in py-spy.
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
            complete, run_ids = await self._r.hmget(keys.META, ["complete", "run_id"])
            if complete is None:
                return False
            if isinstance(run_ids, bytes):  # bytes unless the client decodes responses
                run_ids = run_ids.decode()
            if run_ids is not None and run_ids != await self._run_ids():
                await self.invalidate()
                return False
            return True

    # -- writes ---------------------------------------------------------------

    async def write_users(self, states: Sequence[UserState]) -> None:
        if not states:
            return
        now = time.time()
        async with _guard(self._errors):
            # Through the pipelined connection: its packing costs a fraction of a
            # redis-py call (bench/redis_clients.py: 3.7-4.5x the throughput).  A
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
        timeout.  (Rebuilding 100k users over an unchanged copy, where Redis only
        compares versions: 264-305k -> 383-483k memberships/s against whole slices
        awaited in turn.)  False when the server does not know the script."""
        assert self._fast is not None
        sha = self._write_users.sha
        # A write-through (one call, nothing to overlap) skips the gathers: 24-33 ->
        # 15 us of CPU a write, 64 writers at once against Valkey.
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

    # -- rebuild --------------------------------------------------------------

    async def begin_rebuild(self, lease_s: float) -> str | None:
        generation = secrets.token_hex(8)
        async with _guard(self._errors):
            if not await self._r.set(
                keys.REBUILD_LEASE, generation, nx=True, px=int(lease_s * 1000)
            ):
                return None
            # `building` lives in the meta hashes, so a FLUSHALL (or a shard restart)
            # during the rebuild erases it and the rebuild cannot mark an incomplete
            # copy as complete.  A mark left by an earlier rebuild goes first, so no
            # read trusts it under the new generation.
            try:
                async with self._r.pipeline(transaction=False) as pipe:
                    for meta in (keys.META, *keys.BUCKET_METAS):
                        pipe.hdel(meta, "rebuilt_to")
                        pipe.hset(meta, "building", generation)
                    await pipe.execute()
            except self._errors:
                # Else the lease outlives this failed start by its whole term, and no
                # process rebuilds meanwhile.
                with contextlib.suppress(*self._errors):
                    await self._call(self._release, [keys.REBUILD_LEASE], [generation])
                raise
        return generation

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

    async def _run_ids(self) -> str:
        """The run id of every server (every master on a cluster): any restart changes it."""
        if isinstance(self._r, RedisCluster):
            infos = await self._r.info("server", target_nodes=RedisCluster.PRIMARIES)
            return ",".join(sorted(str(info["run_id"]) for info in infos.values()))
        info = await self._r.info("server")
        return str(info["run_id"])

    # -- sync counters --------------------------------------------------------
    # A customer's key holds its counted promos (promo id -> end, Unix seconds) and its
    # version under the member "#v" (score -version; no promo id starts with "#").
    # Writes are versioned like the user keys: an older state never overwrites a newer.

    async def write_counts(self, counts: Sequence[CustomerCounts]) -> None:
        if not counts:
            return
        default_expiry = int((time.time() + _EMPTY_COUNTS_TTL_S) * 1000)
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for c in counts:
            ends = {promo: end_of_day(day).timestamp() for promo, day in c.promos.items()}
            expire_at = int(max(ends.values()) * 1000) if ends else default_expiry
            args: list[Any] = [c.version, expire_at]
            for promo, until in ends.items():
                args += [promo, repr(until)]
            calls.append(((keys.synced(c.customer_id),), args))
        async with _guard(self._errors):
            for start in range(0, len(calls), 10_000):
                await self._script_calls(self._write_counts, calls[start : start + 10_000])

    async def count_versions(self, customer_ids: Sequence[int]) -> list[int | None]:
        """The version each customer's count key holds (None: no key, or no version)."""
        async with _guard(self._errors), self._r.pipeline(transaction=False) as pipe:
            for cid in customer_ids:
                pipe.zscore(keys.synced(cid), "#v")
            scores = await pipe.execute()
        return [None if s is None else int(-s) for s in scores]

    async def synced_count(self, customer_id: int, now: float) -> int | None:
        async with _guard(self._errors):
            count = await self._call(
                self._count_synced,
                [keys.meta_of(customer_id), keys.synced(customer_id)],
                [f"({now!r}"],
            )
        return None if count is None else int(count)

    # -- reconciliation -------------------------------------------------------

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
