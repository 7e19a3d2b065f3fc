"""The Redis adapter against a real Valkey server."""

from __future__ import annotations

import asyncio
import time

import pytest

from cache import keys
from cache.redis_cache import RedisCache
from service.bootstrap import Container
from service.domain.model import NEVER, Membership, Registry, RegistryEntry, UserState
from service.settings import Settings


@pytest.fixture
async def cache(clean: Container) -> RedisCache:
    return clean.cache


async def test_read_needs_the_completeness_marker(cache: RedisCache) -> None:
    await cache.write_users([UserState(1, 5, (Membership(10),))])
    assert (await cache.read_user(1, time.time())).member_ids == (10,)
    await cache.invalidate()
    assert await cache.read_user(1, time.time()) is None


async def test_expiry_holds_to_the_second(cache: RedisCache) -> None:
    now = time.time()
    await cache.write_users([UserState(1, 5, (Membership(10, now + 5), Membership(11)))])
    assert sorted((await cache.read_user(1, now + 4.999)).member_ids) == [10, 11]
    assert (await cache.read_user(1, now + 5)).member_ids == (11,)


async def test_older_version_never_overwrites_newer(cache: RedisCache) -> None:
    await cache.write_users([UserState(1, 7, (Membership(10),))])
    await cache.write_users([UserState(1, 6, (Membership(99),)), UserState(2, 1, (Membership(3),))])
    assert (await cache.read_user(1, time.time())).member_ids == (10,)
    assert (await cache.read_user(2, time.time())).member_ids == (3,)
    await cache.write_users([UserState(1, 8, ())])
    assert (await cache.read_user(1, time.time())).member_ids == ()
    # The emptied user keeps its version for a while, so an old state cannot come back.
    await cache.write_users([UserState(1, 7, (Membership(10),))])
    assert (await cache.read_user(1, time.time())).member_ids == ()


async def test_exclusions_round_trip(cache: RedisCache) -> None:
    await cache.write_users([UserState(1, 2, (Membership(4),), frozenset({5, 6}))])
    got = await cache.read_user(1, time.time())
    assert got.member_ids == (4,)
    assert sorted(got.excluded_ids) == [5, 6]


async def test_key_expires_natively_when_everything_expires(cache: RedisCache) -> None:
    far = time.time() + 3600
    await cache.write_users([UserState(1, 2, (Membership(4, far),))])
    ttl_ms = await cache._r.pttl(keys.user(1))
    assert 3590_000 < ttl_ms <= 3600_000
    await cache.write_users([UserState(1, 3, (Membership(4, NEVER),))])
    assert await cache._r.pttl(keys.user(1)) == -1


async def test_registry_is_versioned(cache: RedisCache) -> None:
    await cache.write_registry(
        Registry(10, {1: RegistryEntry("A", None), 2: RegistryEntry("B", 50)})
    )
    await cache.write_registry(Registry(9, {1: RegistryEntry("OLD", None)}))
    reg = await cache.read_registry()
    assert reg == Registry(10, {1: RegistryEntry("A", None), 2: RegistryEntry("B", 50)})


async def test_flush_during_rebuild_is_not_marked_complete(cache: RedisCache) -> None:
    await cache.invalidate()
    generation = await cache.begin_rebuild(30)
    assert generation is not None
    assert await cache.begin_rebuild(30) is None  # the lease is held
    await cache._r.flushall()
    assert not await cache.finish_rebuild(generation)
    assert not await cache.is_complete()
    again = await cache.begin_rebuild(30)
    assert again is not None
    assert await cache.finish_rebuild(again)
    assert await cache.is_complete()


async def test_unreachable_redis_raises_cache_unavailable() -> None:
    from service.domain.errors import CacheUnavailable

    dead = RedisCache.from_url("redis://127.0.0.1:9/0", timeout_s=0.1)
    started = time.monotonic()
    with pytest.raises(CacheUnavailable):
        await dead.read_user(1, time.time())
    assert time.monotonic() - started < 1.0
    assert not await dead.ping()
    await dead.close()


async def test_many_users_a_call_skip_only_the_stale_ones(cache: RedisCache) -> None:
    await cache.write_users([UserState(2, 9, (Membership(20),))])
    # 250 users span three write calls; user 2's state is stale and user 3 has more
    # members than one ZADD takes (1,200 members: 2,400 arguments).
    big = tuple(Membership(sid) for sid in range(1, 1201))
    states = [UserState(uid, 5, (Membership(uid),)) for uid in range(1, 251)]
    states[2] = UserState(3, 5, big)
    await cache.write_users(states)
    now = time.time()
    assert (await cache.read_user(1, now)).member_ids == (1,)
    assert (await cache.read_user(2, now)).member_ids == (20,)
    assert sorted((await cache.read_user(3, now)).member_ids) == list(range(1, 1201))
    assert (await cache.read_user(250, now)).member_ids == (250,)


async def test_more_calls_than_connections_wait_instead_of_failing(
    cache: RedisCache, settings: Settings
) -> None:
    # Two connections (per shard on a cluster) for a bulk write of 2,000 users in many
    # buckets, 200 single reads and 20 batch reads at once: calls queue for a
    # connection; none is refused (which would send readers to PostgreSQL).
    small = RedisCache.from_url(
        settings.redis_url, pool_size=2, pipelined_reads=False, cluster=settings.redis_cluster
    )
    try:
        states = [UserState(uid, 1, (Membership(7),)) for uid in range(1, 2001)]
        await small.write_users(states[:200])
        now = time.time()
        _, singles, batches = await asyncio.gather(
            small.write_users(states[200:]),
            asyncio.gather(*(small.read_user(uid, now) for uid in range(1, 201))),
            asyncio.gather(*(small.read_users(list(range(1, 201)), now) for _ in range(20))),
        )
        assert [user.member_ids for user in singles] == [(7,)] * 200
        assert all([u.member_ids for u in batch] == [(7,)] * 200 for batch in batches)
        assert (await small.read_user(2000, time.time())).member_ids == (7,)
    finally:
        await small.close()


async def test_writes_and_reads_survive_a_server_that_forgot_its_scripts(
    cache: RedisCache,
) -> None:
    # A restarted Redis (or SCRIPT FLUSH) knows none of the scripts: a single write, a
    # bulk write and a read each load what they need and succeed.
    await cache.write_users([UserState(1, 1, (Membership(10),))])
    await cache._r.script_flush()
    await cache.write_users([UserState(1, 2, (Membership(11),))])
    await cache._r.script_flush()
    await cache.write_users([UserState(uid, 3, (Membership(12),)) for uid in range(1, 251)])
    await cache._r.script_flush()
    now = time.time()
    assert (await cache.read_user(1, now)).member_ids == (12,)
    assert (await cache.read_user(250, now)).member_ids == (12,)
