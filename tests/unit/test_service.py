"""The service layer on in-memory fakes: read path, write-through, fallback, rebuild."""

import asyncio

import pytest

from service.domain.errors import (
    CacheUnavailable,
    InvalidRequest,
    SegmentNotFound,
    StorageUnavailable,
)
from service.domain.service import AddRequest, SegmentService
from tests.fakes import FakeCache, FakeStore


@pytest.fixture
async def svc() -> tuple[SegmentService, FakeStore, FakeCache]:
    store, cache = FakeStore(), FakeCache()
    service = SegmentService(store, cache, clock=lambda: store.now)
    assert await service.rebuild_cache()
    return service, store, cache


async def test_write_then_read_from_cache(svc) -> None:  # type: ignore[no-untyped-def]
    service, _store, _cache = svc
    await service.create_segment("A")
    await service.create_segment("B")
    assert await service.update_user(5, [AddRequest("B"), AddRequest("A")], []) == ["A", "B"]
    before = service.reads_from_store
    assert await service.user_segments(5) == ["A", "B"]
    assert service.reads_from_store == before


async def test_unknown_slug_changes_nothing(svc) -> None:  # type: ignore[no-untyped-def]
    service, store, _cache = svc
    await service.create_segment("A")
    with pytest.raises(SegmentNotFound) as err:
        await service.update_user(5, [AddRequest("A"), AddRequest("NOPE")], [])
    assert err.value.details == {"slugs": ["NOPE"]}
    assert await service.user_segments(5) == []
    assert store.history == []


async def test_ttl_expires_to_the_second(svc) -> None:  # type: ignore[no-untyped-def]
    service, store, _cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A", ttl_seconds=10)], [])
    store.now += 9.999
    assert await service.user_segments(5) == ["A"]
    store.now += 0.001
    assert await service.user_segments(5) == []


async def test_flushed_cache_answers_from_store_then_rebuilds(svc) -> None:  # type: ignore[no-untyped-def]
    service, _store, cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    cache.flush()
    assert await service.user_segments(5) == ["A"]
    assert service.reads_from_store >= 1
    assert service._rebuild_task is not None
    assert await service._rebuild_task
    assert await cache.is_complete()
    assert cache.users[5].memberships


async def test_cache_down_falls_back_and_write_still_succeeds(svc) -> None:  # type: ignore[no-untyped-def]
    service, _store, cache = svc
    await service.create_segment("A")
    cache.down = True
    assert await service.update_user(5, [AddRequest("A")], []) == ["A"]
    assert await service.user_segments(5) == ["A"]


async def test_delete_hides_segment_at_once_and_recreate_is_empty(svc) -> None:  # type: ignore[no-untyped-def]
    service, _store, _cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    await service.delete_segment("A")
    assert await service.user_segments(5) == []
    await service.create_segment("A")
    assert await service.user_segments(5) == []


async def test_other_worker_sees_new_registry(svc) -> None:  # type: ignore[no-untyped-def]
    service, store, cache = svc
    other = SegmentService(store, cache, clock=lambda: store.now)
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    assert await other.user_segments(5) == ["A"]
    await service.delete_segment("A")
    assert await other.user_segments(5) == []


async def test_stale_rebuild_never_overwrites_newer_state(svc) -> None:  # type: ignore[no-untyped-def]
    service, store, cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    old = await store.user_state(5)
    await service.update_user(5, [], ["A"])
    await cache.write_users([old])
    assert await service.user_segments(5) == []


async def test_invalid_user_id(svc) -> None:  # type: ignore[no-untyped-def]
    service, _, _ = svc
    with pytest.raises(InvalidRequest):
        await service.user_segments(0)


async def test_a_failed_rebuild_gives_its_lease_up(svc) -> None:  # type: ignore[no-untyped-def]
    service, store, cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    await cache.invalidate()
    real = store.user_states

    def broken(batch_size: int):  # type: ignore[no-untyped-def]
        raise StorageUnavailable("PostgreSQL went away mid-rebuild")

    store.user_states = broken
    assert not await service.rebuild_cache()
    await asyncio.sleep(0)  # the release runs in the background
    await asyncio.sleep(0)
    assert cache.lease is None  # not held for the lease's 30 s
    store.user_states = real
    assert await service.rebuild_cache()
    assert await service.user_segments(5) == ["A"]


async def test_a_rebuild_interrupted_by_redis_releases_once_redis_is_back(svc) -> None:  # type: ignore[no-untyped-def]
    service, _store, cache = svc
    await cache.invalidate()
    real = cache.write_registry

    async def down_after_lease(registry):  # type: ignore[no-untyped-def]
        cache.down = True
        return await real(registry)

    cache.write_registry = down_after_lease
    assert not await service.rebuild_cache()
    assert cache.lease is not None  # Redis is down: the release keeps trying
    cache.write_registry = real
    cache.down = False
    for _ in range(20):
        if cache.lease is None:
            break
        await asyncio.sleep(0.05)
    assert cache.lease is None
    assert await service.rebuild_cache()


async def test_a_rebuild_writes_a_failed_batch_again(svc, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, _store, cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    cache.flush()
    monkeypatch.setattr("service.domain.cache_copy._REBUILD_RETRY_DELAYS_S", (0.0, 0.0))
    real = cache.write_users
    failures = 0

    async def once_slow(states):  # type: ignore[no-untyped-def]
        nonlocal failures
        if failures == 0:
            failures += 1
            raise CacheUnavailable("Redis reply timed out; connection closed")
        await real(states)

    cache.write_users = once_slow
    assert await service.rebuild_cache()  # one slow reply does not end the rebuild
    assert failures == 1
    assert cache.users[5].memberships


async def test_a_rebuild_ends_when_redis_keeps_failing(svc, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, _store, cache = svc
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    cache.flush()
    monkeypatch.setattr("service.domain.cache_copy._REBUILD_RETRY_DELAYS_S", (0.0, 0.0))
    calls = 0

    async def down(states):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        raise CacheUnavailable("down")

    cache.write_users = down
    assert not await service.rebuild_cache()
    assert calls == 3  # two retries, then the last try


async def test_a_paced_rebuild_writes_small_chunks_and_marks_each_batch() -> None:
    """Paced, a rebuild never hands Redis a whole batch at once (the reads it serves
    meanwhile would queue behind it), and the progress mark follows every batch."""
    store, cache = FakeStore(), FakeCache()
    writer = SegmentService(store, cache, clock=lambda: store.now)
    await writer.create_segment("A")
    for uid in range(1, 1201):
        await writer.update_user(uid, [AddRequest("A")], [])
    cache.flush()
    writes: list[int] = []
    marks: list[int] = []
    write_users, mark_rebuilt = cache.write_users, cache.mark_rebuilt

    async def recording_write(states):  # type: ignore[no-untyped-def]
        writes.append(len(states))
        await write_users(states)

    async def recording_mark(generation: str, upto: int) -> bool:
        marks.append(upto)
        return await mark_rebuilt(generation, upto)

    cache.write_users = recording_write  # type: ignore[method-assign]
    cache.mark_rebuilt = recording_mark  # type: ignore[method-assign]
    paced = SegmentService(
        store, cache, clock=lambda: store.now, rebuild_batch=10_000, rebuild_max_users_per_s=8000
    )
    assert await paced.rebuild_cache()
    # A quarter of a second's worth a query (2,000 > 1,200 users: one batch), written
    # 500 users at a time, marked once after its last user.
    assert writes == [500, 500, 200]
    assert marks == [1200]
    assert await paced.user_segments(1200) == ["A"]


async def test_fallback_reads_fail_rather_than_hang_when_their_queries_are_cancelled() -> None:
    """At shutdown the tasks querying PostgreSQL for reads are cancelled: the reads
    they carry, and the reads queued behind them, end with StorageUnavailable."""
    store, cache = FakeStore(), FakeCache()
    service = SegmentService(store, cache, fallback_concurrency=1, rebuild_delay_s=60)
    started, never = asyncio.Event(), asyncio.Event()

    async def stuck(user_ids):  # type: ignore[no-untyped-def]
        started.set()
        await never.wait()

    service._fallback_reads._fetch = stuck
    reads = [asyncio.create_task(service.user_segments(uid)) for uid in (1, 2, 3)]
    await asyncio.wait_for(started.wait(), 5)
    for task in list(service._fallback_reads._tasks):
        task.cancel()
    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 5)
    assert all(isinstance(r, StorageUnavailable) for r in results), results
    if service._rebuild_task is not None:
        service._rebuild_task.cancel()


async def test_during_a_rebuild_reads_above_its_mark_skip_redis() -> None:
    store, cache = FakeStore(), FakeCache()
    writer = SegmentService(store, cache, clock=lambda: store.now)
    await writer.create_segment("A")
    for uid in range(1, 41):
        await writer.update_user(uid, [AddRequest("A")], [])
    cache.flush()
    generation = await cache.begin_rebuild(30)
    assert generation is not None
    await cache.write_registry(await store.registry())
    await cache.write_users([await store.user_state(u) for u in range(1, 21)])
    assert await cache.mark_rebuilt(generation, 20)
    asked: list[int] = []
    read_user = cache.read_user

    async def counted(user_id: int, now: float):  # type: ignore[no-untyped-def]
        asked.append(user_id)
        return await read_user(user_id, now)

    cache.read_user = counted  # type: ignore[method-assign]
    reader = SegmentService(store, cache, clock=lambda: store.now, rebuild_delay_s=60)
    assert await reader.user_segments(30) == ["A"]  # Redis says "not yet": mark asked
    assert reader._mark_task is not None
    await reader._mark_task
    for uid in (31, 35, 40):
        assert await reader.user_segments(uid) == ["A"]  # straight to PostgreSQL
    assert await reader.user_segments(10) == ["A"]  # behind the mark: Redis answers
    assert asked == [30, 10]
    assert (reader.reads_from_cache, reader.reads_from_store) == (1, 4)
    # The mark, once asked, holds for a tenth of a second; then Redis is asked again.
    reader._mark_hint_until = 0.0
    assert await reader.user_segments(33) == ["A"]
    assert asked == [30, 10, 33]
    if reader._rebuild_task is not None:
        reader._rebuild_task.cancel()


async def test_a_start_whose_reply_was_lost_keeps_its_lease() -> None:
    """The lease was taken but the reply timed out: the retry (same generation) takes
    the rebuild on instead of finding the lease held and leaving it for its term."""
    store, cache = FakeStore(), FakeCache()
    writer = SegmentService(store, cache, clock=lambda: store.now)
    await writer.create_segment("A")
    await writer.update_user(1, [AddRequest("A")], [])
    cache.flush()
    begin = cache.begin_rebuild
    tries: list[str | None] = []

    async def lost_reply(lease_s: float, generation: str | None = None) -> str | None:
        tries.append(generation)
        taken = await begin(lease_s, generation)
        if len(tries) == 1:
            raise CacheUnavailable("Timeout reading")  # it landed all the same
        return taken

    cache.begin_rebuild = lost_reply  # type: ignore[method-assign]
    assert await writer.rebuild_cache()
    assert len(tries) == 2 and tries[0] == tries[1] is not None
    assert await writer.user_segments(1) == ["A"]


async def test_a_start_that_keeps_failing_releases_the_lease_it_may_hold() -> None:
    store, cache = FakeStore(), FakeCache()
    service = SegmentService(store, cache, clock=lambda: store.now)
    cache.flush()
    begin = cache.begin_rebuild

    async def always_lost(lease_s: float, generation: str | None = None) -> str | None:
        await begin(lease_s, generation)
        raise CacheUnavailable("Timeout reading")

    cache.begin_rebuild = always_lost  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("service.domain.cache_copy._REBUILD_RETRY_DELAYS_S", (0.0, 0.0))
        assert not await service.rebuild_cache()
    assert cache.lease is not None
    assert service._release_task is not None
    await service._release_task
    assert cache.lease is None  # the next rebuild need not wait out the lease
