"""The reconciler on in-memory fakes: a whole round of ``segments reconcile`` over a
container built with fakes injected, and the repairs of ``Reconciler`` itself."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from service import reconciler as reconciler_process
from service.bootstrap import build
from service.domain.model import NEVER, AddItem, Membership, UserChange, UserState
from service.domain.promos import PromoService
from service.domain.reconcile import Reconciler, ScanResult
from service.domain.service import AddRequest, SegmentService
from service.settings import Settings
from tests.fakes import FakeAudienceStore, FakeCache, FakeCp, FakeFigures, FakeStore, NoPromos


async def test_a_round_drains_the_outbox_sweeps_expiries_and_confirms_the_copy() -> None:
    store, cache, cp = FakeStore(), FakeCache(), FakeCp()
    store.now = time.time()  # the services built here use the real clock
    figures = FakeFigures(store)
    container = await build(
        Settings(sweep_interval_s=60.0),
        store=store,
        cache=cache,
        cp=cp,
        audience_store=FakeAudienceStore(),
        promo_store=NoPromos(),
        figures=figures,
    )
    assert await container.segments.rebuild_cache()
    seg = await store.create_segment("A", "", None)
    # Committed in PostgreSQL but never written to Redis: a process died in between.
    await store.apply_change(UserChange(1, (AddItem("A"),), ()), [None])
    expiry = store.now + 1
    await store.apply_change(UserChange(2, (AddItem("A", expiry),), ()), [expiry])
    assert cache.users == {}
    store.now += 100  # the outbox rows are old; user 2's membership has expired

    stop = asyncio.Event()
    task = asyncio.create_task(reconciler_process.run(container, stop))
    await asyncio.wait_for(figures.backlog_read.wait(), 10)  # the round's last step
    stop.set()
    await task

    assert store.partition_checks == 1
    assert cache.users[1] == UserState(1, store.versions[1], (Membership(seg.id, NEVER),))
    # Drained first, then swept: user 2's membership ended at its expiry, in Redis too.
    assert cache.users[2] == UserState(2, store.versions[2], ())
    assert (2, "A", "remove", expiry) in store.history
    assert store.outbox == [(2, store.now)]  # the sweep's own row, for a later round
    assert cache.meta["divergence_found"] == 0
    assert "synchronized_on" in cache.meta
    rows = REGISTRY.get_sample_value("segments_outbox_rows", {"outbox": "cache"})
    assert rows == 1.0
    await container.close()
    assert store.closed and cache.closed and cp.closed


async def _setup() -> tuple[Reconciler, SegmentService, FakeStore, FakeCache]:
    store, cache = FakeStore(), FakeCache()
    segments = SegmentService(store, cache, clock=lambda: store.now)
    promos = PromoService(NoPromos(), cache, FakeCp(), clock=lambda: store.now)
    reconciler = Reconciler(store, cache, segments, promos, clock=lambda: store.now)
    assert await segments.rebuild_cache()
    await segments.create_segment("A")
    await segments.update_user(1, [AddRequest("A")], [])
    await segments.update_user(2, [AddRequest("A")], [])
    return reconciler, segments, store, cache


async def test_scan_repairs_users_behind_postgresql() -> None:
    reconciler, _segments, store, cache = await _setup()
    del cache.users[1]  # a write-through lost
    cache.users[2] = UserState(2, 0, ())  # an older state
    result = await reconciler.scan(recheck_after_s=0)
    assert result == ScanResult(users=2, found=2, repaired=2)
    assert cache.users[1] == await store.user_state(1)
    assert cache.users[2] == await store.user_state(2)
    assert cache.meta == {
        "divergence_found": 2,
        "divergence_repaired": 2,
        "synchronized_on": store.now,
    }
    assert await reconciler.scan(recheck_after_s=0) == ScanResult(users=2, found=0, repaired=0)


async def test_step_rebuilds_an_incomplete_copy_else_drains_the_outbox() -> None:
    reconciler, _segments, store, cache = await _setup()
    cache.flush()
    await reconciler.step()
    assert await cache.is_complete()
    assert set(cache.users) == {1, 2}
    assert len(store.outbox) == 2  # a rebuild leaves the outbox alone
    await reconciler.step()
    assert len(store.outbox) == 2  # rows younger than a second: the write-through's
    store.now += 2
    cache.users.clear()  # so that the drain shows in Redis
    await reconciler.step()
    assert store.outbox == []
    assert set(cache.users) == {1, 2}


async def test_a_fake_store_needs_the_adapters_built_over_postgresql() -> None:
    with pytest.raises(TypeError, match="audience_store, promo_store and figures"):
        await build(Settings(), store=FakeStore(), cache=FakeCache(), cp=FakeCp())
