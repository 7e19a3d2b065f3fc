"""The pacing of background jobs (service/domain/pacing.py), the API's deferred rebuild,
and their settings."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.domain.pacing import Pacer
from service.domain.service import AddRequest, SegmentService
from service.settings import load_settings
from tests.fakes import FakeCache, FakeStore


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def pacer(rate: float, t: FakeTime) -> Pacer:
    return Pacer(rate, clock=t.clock, sleep=t.sleep)


async def test_a_fast_batch_waits_for_the_rest_of_its_share() -> None:
    t = FakeTime()
    pace = pacer(1000, t)
    pace.start()
    t.now += 0.2  # 500 items done in 0.2 s: their share at 1,000/s is 0.5 s
    await pace(500)
    assert t.sleeps == [pytest.approx(0.3)]
    t.now += 0.1
    await pace(500)  # the next share starts where the previous one ended
    assert t.sleeps == [pytest.approx(0.3), pytest.approx(0.4)]
    assert pace.slept_s == pytest.approx(0.7)


async def test_a_slow_batch_earns_no_credit_for_a_burst() -> None:
    t = FakeTime()
    pace = pacer(1000, t)
    pace.start()
    t.now += 2.0  # far slower than the rate
    await pace(500)
    assert t.sleeps == []
    t.now += 0.1  # the next batch is paced from now, not allowed to catch up
    await pace(500)
    assert t.sleeps == [pytest.approx(0.4)]


async def test_rate_zero_never_sleeps() -> None:
    t = FakeTime()
    pace = pacer(0, t)
    pace.start()
    for _ in range(3):
        await pace(10_000)
    assert t.sleeps == []


async def test_without_start_the_first_batch_only_sets_the_mark() -> None:
    t = FakeTime()
    pace = pacer(100, t)
    await pace(100)
    assert t.sleeps == []
    await pace(100)
    assert t.sleeps == [pytest.approx(1.0)]


def test_pacing_settings_parse_and_default() -> None:
    defaults = load_settings({})
    assert defaults.scan_max_users_per_s > 0
    assert defaults.rebuild_max_users_per_s >= 0
    assert defaults.ingest_max_members_per_s >= 0
    assert defaults.rebuild_delay_s > 0
    s = load_settings(
        {
            "SEGMENTS_SCAN_MAX_USERS_PER_S": "2500.5",
            "SEGMENTS_REBUILD_MAX_USERS_PER_S": "0",
            "SEGMENTS_INGEST_MAX_MEMBERS_PER_S": "1000",
        }
    )
    assert (s.scan_max_users_per_s, s.rebuild_max_users_per_s) == (2500.5, 0.0)
    assert s.ingest_max_members_per_s == 1000
    with pytest.raises(ValueError):
        load_settings({"SEGMENTS_SCAN_MAX_USERS_PER_S": "fast"})


async def test_a_read_of_a_flushed_cache_leaves_the_rebuild_to_another_process_first() -> None:
    store, cache = FakeStore(), FakeCache()
    service = SegmentService(store, cache, clock=lambda: store.now, rebuild_delay_s=0.2)  # type: ignore[arg-type]
    assert await service.rebuild_cache()
    await service.create_segment("A")
    await service.update_user(5, [AddRequest("A")], [])
    # Another process (the reconciler) rebuilds within the delay: this one does not.
    cache.flush()
    assert await service.user_segments(5) == ["A"]
    assert service._rebuild_task is not None
    await asyncio.sleep(0.05)
    assert not cache.complete and cache.lease is None  # waiting, not rebuilding
    other = SegmentService(store, cache, clock=lambda: store.now)  # type: ignore[arg-type]
    assert await other.rebuild_cache()
    assert not await service._rebuild_task  # found the copy complete
    # Nobody does: this process rebuilds after the delay, without another read.
    cache.flush()
    service._next_rebuild_at = 0.0
    assert await service.user_segments(5) == ["A"]
    started = time.monotonic()
    assert await service._rebuild_task
    assert time.monotonic() - started >= 0.15
    assert await cache.is_complete() and cache.users[5].memberships
