"""Paced background jobs against the real stores: they take the time their rate says,
and do the same work as unpaced."""

from __future__ import annotations

import time

import asyncpg
import pytest

import persistence.audiences.members
from persistence.audiences import PgAudienceStore
from service.bootstrap import Container
from service.domain.audiences import AudienceChange, AudienceKey
from service.domain.reconcile import Reconciler
from service.domain.service import SegmentService

USERS = 2500


async def _users(db: asyncpg.Connection, container: Container, members: bool) -> None:
    await db.copy_records_to_table(
        "user_versions",
        records=[(u, 1) for u in range(1, USERS + 1)],
        columns=["user_id", "version"],
    )
    if members:
        segment = await container.segments.create_segment("PACED")
        await db.copy_records_to_table(
            "memberships",
            records=[(u, segment.id) for u in range(1, USERS + 1)],
            columns=["user_id", "segment_id"],
        )


async def test_a_paced_scan_takes_its_time_and_sees_every_user(
    clean: Container, db: asyncpg.Connection
) -> None:
    await _users(db, clean, members=False)
    paced = Reconciler(
        clean.store, clean.cache, clean.segments, clean.promos, scan_max_users_per_s=5000
    )
    started = time.monotonic()
    result = await paced.scan(batch=500, recheck_after_s=0)
    elapsed = time.monotonic() - started
    assert result.users == USERS
    assert elapsed >= 0.45  # 5 batches of 500 at 5,000/s: 0.5 s
    unpaced = Reconciler(clean.store, clean.cache, clean.segments, clean.promos)
    started = time.monotonic()
    assert (await unpaced.scan(batch=500, recheck_after_s=0)).users == USERS
    assert time.monotonic() - started < elapsed


async def test_a_paced_rebuild_takes_its_time_and_completes(
    clean: Container, db: asyncpg.Connection
) -> None:
    await _users(db, clean, members=True)
    segments = SegmentService(
        clean.store, clean.cache, rebuild_batch=500, rebuild_max_users_per_s=5000
    )
    await clean.cache._r.flushall()
    started = time.monotonic()
    assert await segments.rebuild_cache()
    assert time.monotonic() - started >= 0.45
    assert await segments.cache_complete()
    assert await clean.cache.versions([1, USERS]) == [1, 1]


async def test_a_paced_replace_copies_in_slices_in_one_transaction(
    clean: Container, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persistence.audiences.members, "PACED_COPY_ROWS", 7)
    store = PgAudienceStore(clean.store, max_members_per_s=100)
    key = AudienceKey(7, "PACED")
    ids = list(range(1000, 1030))
    started = time.monotonic()
    info = await store.apply(AudienceChange(key, "replace", add=ids))
    assert time.monotonic() - started >= 0.25  # 28 members at 100/s before the last slice
    assert info is not None and info.customers == len(ids)
    members = await db.fetch(
        "SELECT m.customer_id FROM audience_members m JOIN audiences a"
        " ON a.generation = m.generation WHERE a.merchant_id = 7 AND a.segment_type = 'PACED'"
        " ORDER BY 1"
    )
    assert [r[0] for r in members] == ids
