"""The e2e read/write suites and the cache adapter's tests, collected again here so they
run against the cluster (see conftest.py), plus what only a cluster can do: lose one
shard on its own."""

from __future__ import annotations

import asyncio

import aiohttp

from cache import keys
from devstack import EmbeddedValkeyCluster
from service.bootstrap import Container
from tests.e2e.test_audiences import *  # noqa: F403
from tests.e2e.test_experiments_api import *  # noqa: F403
from tests.e2e.test_experiments_api import create, segments_of, update, wait_until_complete
from tests.e2e.test_lifecycle import *  # noqa: F403
from tests.integration.test_cache import *  # noqa: F403


def test_keys_of_one_bucket_share_a_slot() -> None:
    from redis.crc import key_slot

    for uid in (1, 1024, 123_456_789, 2**63 - 1):
        assert key_slot(keys.user(uid).encode()) == key_slot(keys.meta_of(uid).encode())
        assert key_slot(keys.synced(uid).encode()) == key_slot(keys.meta_of(uid).encode())


async def test_users_spread_over_every_master(clean: Container) -> None:
    slots = {keys.user(uid) for uid in range(3000)}
    cluster = clean.cache._r
    nodes = {cluster.get_node_from_key(key).name for key in slots}  # type: ignore[union-attr]
    assert len(nodes) == 3


async def test_a_shard_restarted_empty_is_never_taken_for_truth(
    http: aiohttp.ClientSession, clean: Container, valkey_cluster: EmbeddedValkeyCluster
) -> None:
    await create(http, "A")
    for uid in range(1, 61):
        await update(http, uid, ["A"])
    victim = valkey_cluster.nodes[1]
    victim.stop()
    victim.start()  # same node id (nodes.conf), no data: its buckets lost their markers
    # While the cluster heals and the copy is rebuilt, every answer is still right:
    # from PostgreSQL where Redis cannot vouch for the bucket.
    for _ in range(3):
        answers = await asyncio.gather(*(segments_of(http, uid) for uid in range(1, 61)))
        assert answers == [["A"]] * 60
        await asyncio.sleep(0.5)
    # The new run of that master is noticed and the whole copy rebuilt.
    await wait_until_complete(clean, within_s=20)
    served_from_store = clean.segments.reads_from_store
    assert await asyncio.gather(*(segments_of(http, uid) for uid in range(1, 61))) == [["A"]] * 60
    assert clean.segments.reads_from_store == served_from_store
