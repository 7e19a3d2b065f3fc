"""Reads while the cache is being rebuilt: users the rebuild has written are answered
from Redis, the others from PostgreSQL (docs/cache-format.md, "Completeness")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from cache import keys
from cache.redis_cache import RedisCache
from service.bootstrap import Container
from service.domain.model import Membership, Registry, RegistryEntry, UserState
from service.domain.service import AddRequest, SegmentService


async def test_progress_mark_answers_users_behind_it(clean: Container) -> None:
    cache: RedisCache = clean.cache
    await cache._r.flushall()
    generation = await cache.begin_rebuild(30)
    assert generation is not None
    await cache.write_registry(Registry(3, {10: RegistryEntry("A", None)}))
    await cache.write_users([UserState(5, 2, (Membership(10),))])
    now = time.time()
    assert await cache.read_user(5, now) is None  # no mark yet
    assert await cache.mark_rebuilt(generation, 7)
    assert (await cache.read_user(5, now)).member_ids == (10,)
    assert (await cache.read_user(7, now)).member_ids == ()  # written: no segments
    assert await cache.read_user(8, now) is None  # not reached yet
    assert [c.member_ids for c in await cache.read_users([7, 5], now)] == [(), (10,)]
    assert await cache.read_users([5, 8], now) is None
    # A flush takes the mark with the users; the rebuild cannot put it back.
    await cache._r.flushall()
    await cache.write_registry(Registry(3, {10: RegistryEntry("A", None)}))
    assert not await cache.mark_rebuilt(generation, 9)
    assert await cache.read_user(5, now) is None
    # A new rebuild after a flush starts from nothing.
    await cache.release_rebuild(generation)
    again = await cache.begin_rebuild(30)
    assert again is not None
    assert await cache.resume_point(again) == 0
    assert await cache.mark_rebuilt(again, 9)
    # An interrupted rebuild's mark passes to the next rebuild while no flush comes
    # between (it resumes after it); a flush takes it, and the next starts over.
    await cache.release_rebuild(again)
    third = await cache.begin_rebuild(30)
    assert third is not None
    assert await cache.resume_point(third) == 9
    assert not await cache.mark_rebuilt(again, 12)  # the interrupted one marks no more
    await cache._r.flushall()
    await cache.write_registry(Registry(3, {10: RegistryEntry("A", None)}))
    fourth = await cache.begin_rebuild(30)
    assert fourth is not None
    assert await cache.resume_point(fourth) == 0
    assert await cache.read_user(5, now) is None


async def test_rebuild_in_progress_serves_rebuilt_users_from_redis(clean: Container) -> None:
    writer = clean.segments
    await writer.create_segment("a")
    await writer.create_segment("b")
    for uid in range(1, 31):
        await writer.update_user(uid, [AddRequest("a")], [])
    await clean.cache._r.flushall()

    paused, resume = asyncio.Event(), asyncio.Event()

    async def progress(users: int) -> None:
        # Before the second batch is written the first is written and marked.
        if users == 20:
            paused.set()
            await resume.wait()

    rebuilder = SegmentService(clean.store, clean.cache, rebuild_batch=10)
    rebuilder.rebuild_progress = progress
    rebuild = asyncio.create_task(rebuilder.rebuild_cache())
    await asyncio.wait_for(paused.wait(), 10)
    assert not await clean.cache.is_complete()

    # A reader in another process: it starts no rebuild of its own here.
    reader = SegmentService(clean.store, clean.cache, rebuild_delay_s=60)
    assert await reader.user_segments(3) == ["a"]
    assert (reader.reads_from_cache, reader.reads_from_store) == (1, 0)
    assert await reader.user_segments(25) == ["a"]
    assert (reader.reads_from_cache, reader.reads_from_store) == (1, 1)
    # Writes during the rebuild: on both sides of the mark, the next read has them.
    await writer.update_user(3, [AddRequest("b")], ["a"])
    await writer.update_user(25, [AddRequest("b")], [])
    assert await reader.user_segments(3) == ["b"]
    assert await reader.user_segments(25) == ["a", "b"]
    assert (reader.reads_from_cache, reader.reads_from_store) == (2, 2)
    # A segment created meanwhile shows in the answers from PostgreSQL too: the
    # fallback follows the registry's version.
    await writer.create_segment("c")
    await writer.update_user(26, [AddRequest("c")], [])
    assert await reader.user_segments(26) == ["a", "c"]

    resume.set()
    assert await asyncio.wait_for(rebuild, 30)
    # The reader sends reads above the mark it last asked for straight to PostgreSQL
    # for a tenth of a second at most (reads.py, _MARK_HINT_S).
    await asyncio.sleep(0.15)
    assert await reader.user_segments(25) == ["a", "b"]
    assert await reader.user_segments(26) == ["a", "c"]
    assert reader.reads_from_store == 3
    if reader._rebuild_task is not None:  # asked for by the read of user 25, delayed
        reader._rebuild_task.cancel()


async def test_concurrent_fallback_reads_share_queries(clean: Container) -> None:
    writer = clean.segments
    await writer.create_segment("a")
    for uid in range(1, 201):
        await writer.update_user(uid, [AddRequest("a")] if uid % 2 else [], [])
    await clean.cache.invalidate()
    queries = 0
    fetch = clean.store.user_states_for_read

    async def counted(user_ids: Sequence[int]) -> tuple[dict[int, UserState], int]:
        nonlocal queries
        queries += 1
        return await fetch(user_ids)

    reader = SegmentService(clean.store, clean.cache, fallback_concurrency=2, rebuild_delay_s=60)
    reader._fallback_reads._fetch = counted
    answers = await asyncio.gather(*(reader.user_segments(uid) for uid in range(1, 201)))
    assert answers == [["a"] if uid % 2 else [] for uid in range(1, 201)]
    assert reader.reads_from_store == 200
    # The first two go alone; the rest wait for them and go together.
    assert queries <= 4
    if reader._rebuild_task is not None:
        reader._rebuild_task.cancel()


async def _interrupted_rebuild(clean: Container, users: int, stop_at: int) -> int:
    """A rebuild (batches of 10) that fails once ``stop_at`` users are handed to Redis;
    returns the progress mark it left (the lease released, as after a failure)."""

    async def progress(done: int) -> None:
        if done == stop_at:
            raise RuntimeError("the rebuilding process dies here")

    rebuilder = SegmentService(clean.store, clean.cache, rebuild_batch=10)
    rebuilder.rebuild_progress = progress
    assert not await rebuilder.rebuild_cache()
    assert rebuilder._release_task is not None
    await asyncio.wait_for(rebuilder._release_task, 10)
    marks = {await clean.cache._r.hget(meta, "rebuilt_to") for meta in keys.BUCKET_METAS}
    assert len(marks) == 1
    (mark,) = marks
    assert mark is not None
    return int(mark)


async def _rebuild_writes(clean: Container) -> list[int]:
    """Run a rebuild (batches of 10) to completion; the users it wrote, in order."""
    written: list[int] = []
    write_users = clean.cache.write_users

    async def recording(states: Sequence[UserState]) -> None:
        written.extend(s.user_id for s in states)
        await write_users(states)

    clean.cache.write_users = recording  # type: ignore[method-assign]
    try:
        assert await SegmentService(clean.store, clean.cache, rebuild_batch=10).rebuild_cache()
    finally:
        del clean.cache.write_users
    return written


async def test_a_rebuild_resumes_from_an_interrupted_ones_mark(clean: Container) -> None:
    writer = clean.segments
    await writer.create_segment("a")
    await writer.create_segment("b")
    for uid in range(1, 51):
        await writer.update_user(uid, [AddRequest("a")], [])
    await clean.cache._r.flushall()
    mark = await _interrupted_rebuild(clean, 50, stop_at=30)
    assert 10 <= mark <= 30

    # Between the two rebuilds the mark still holds: users behind it come from Redis,
    # and a write to one of them is in the next answer.
    reader = SegmentService(clean.store, clean.cache, rebuild_delay_s=60)
    await writer.update_user(5, [AddRequest("b")], [])
    assert await reader.user_segments(5) == ["a", "b"]
    assert await reader.user_segments(mark + 1) == ["a"]
    assert (reader.reads_from_cache, reader.reads_from_store) == (1, 1)

    written = await _rebuild_writes(clean)
    # The second rebuild wrote only the users after the mark.
    assert written == list(range(mark + 1, 51))
    assert await clean.cache.is_complete()
    fresh = SegmentService(clean.store, clean.cache)
    answers = await fresh.users_segments(list(range(1, 51)))
    assert answers == {uid: ["a", "b"] if uid == 5 else ["a"] for uid in range(1, 51)}
    assert fresh.reads_from_store == 0
    if reader._rebuild_task is not None:
        reader._rebuild_task.cancel()


async def test_a_flush_between_rebuilds_means_starting_over(clean: Container) -> None:
    writer = clean.segments
    await writer.create_segment("a")
    for uid in range(1, 41):
        await writer.update_user(uid, [AddRequest("a")], [])
    await clean.cache._r.flushall()
    await _interrupted_rebuild(clean, 40, stop_at=30)
    await clean.cache._r.flushall()
    written = await _rebuild_writes(clean)
    assert written == list(range(1, 41))
    reader = SegmentService(clean.store, clean.cache)
    assert await reader.users_segments(list(range(1, 41))) == {u: ["a"] for u in range(1, 41)}


async def test_progress_mark_tells_how_far_a_rebuild_came(clean: Container) -> None:
    cache: RedisCache = clean.cache
    assert await cache.progress_mark(5) is None  # complete
    await cache._r.flushall()
    assert await cache.progress_mark(5) == 0
    generation = await cache.begin_rebuild(30)
    assert generation is not None
    assert await cache.mark_rebuilt(generation, 7)
    assert [await cache.progress_mark(u) for u in (5, 1023, 1024, 10**12)] == [7, 7, 7, 7]
    assert await cache.finish_rebuild(generation)
    assert await cache.progress_mark(5) is None


async def test_a_server_restart_ends_the_rebuild_it_interrupted(clean: Container) -> None:
    """A Redis restarted from its files mid-rebuild brings back the rebuild's
    `building` and marks, but maybe not the last writes behind them: the rebuild marks
    no more, reads stop trusting its marks and the next rebuild starts over."""
    cache: RedisCache = clean.cache
    await cache._r.flushall()
    generation = await cache.begin_rebuild(30)
    assert generation is not None
    await cache.write_registry(Registry(3, {10: RegistryEntry("A", None)}))
    await cache.write_users([UserState(5, 2, (Membership(10),))])
    assert await cache.mark_rebuilt(generation, 7)
    now = time.time()
    assert (await cache.read_user(5, now)).member_ids == (10,)
    assert not await cache.is_complete()  # same server: the rebuild goes on
    assert await cache.mark_rebuilt(generation, 8)
    # As if the server had restarted since the rebuild began (a new run id).
    await cache._r.hset(keys.META, "building_runs", "an-earlier-run")
    assert not await cache.is_complete()
    assert await cache.read_user(5, now) is None
    assert not await cache.mark_rebuilt(generation, 9)
    assert not await cache.finish_rebuild(generation)
    await cache.release_rebuild(generation)  # as rebuild_cache does when superseded
    again = await cache.begin_rebuild(30)
    assert again is not None
    assert await cache.resume_point(again) == 0


async def test_a_lease_taken_under_a_generation_is_taken_again_by_it(clean: Container) -> None:
    cache: RedisCache = clean.cache
    await cache._r.flushall()
    # An earlier try's SET landed; its reply did not.
    await cache._r.set(keys.REBUILD_LEASE, "g-1", px=30_000)
    assert await cache.begin_rebuild(30, "g-2") is None
    assert await cache.begin_rebuild(30, "g-1") == "g-1"
    assert await cache._r.pttl(keys.REBUILD_LEASE) > 29_000
    assert await cache.begin_rebuild(30) is None


async def test_one_lease_among_many_concurrent_starts_and_their_retries(
    clean: Container,
) -> None:
    """Twenty rebuilds start at once, then every one tries again under its own
    generation (as after a lost reply): one of them, and only one, holds the lease."""
    cache: RedisCache = clean.cache
    await cache._r.flushall()
    generations = [f"g-{i}" for i in range(20)]
    first = await asyncio.gather(*(cache.begin_rebuild(30, g) for g in generations))
    again = await asyncio.gather(*(cache.begin_rebuild(30, g) for g in generations))
    winners = {g for g in (*first, *again) if g is not None}
    assert len(winners) == 1
    (winner,) = winners
    assert first.count(winner) == again.count(winner) == 1
    assert (await cache._r.get(keys.REBUILD_LEASE)).decode() == winner
