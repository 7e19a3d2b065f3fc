"""Many concurrent changes of one user against the real PostgreSQL: every one applied
exactly once, in one order, without one hot user taking the connection pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from persistence.store import PgStore
from service.bootstrap import Container
from service.domain.errors import OutcomeUnknown, StorageUnavailable
from service.domain.model import AddItem, AppliedChange, UserChange
from service.settings import Settings
from tests.checks import replayed_history

SLUGS = ["A", "B", "C", "D"]


def change(uid: int, i: int) -> UserChange:
    """The i-th change of a run: adds two segments and removes a third, so consecutive
    changes always change something."""
    return UserChange(
        uid, (AddItem(SLUGS[i % 4]), AddItem(SLUGS[(i + 1) % 4])), (SLUGS[(i + 2) % 4],)
    )


async def apply(store: PgStore, uid: int, i: int) -> AppliedChange:
    return await store.apply_change(change(uid, i), [None, None])


@pytest.fixture
async def segments(clean: Container) -> Container:
    for slug in SLUGS:
        await clean.store.create_segment(slug, "", None)
    return clean


@pytest.fixture
async def other_store(settings: Settings) -> AsyncIterator[PgStore]:
    """A second pool on the same database: what a second API process has."""
    store = await PgStore.connect(settings.database_url, max_size=20)
    yield store
    await store.close()


async def check_applied_once_each(
    db: asyncpg.Connection, uid: int, applied: list[AppliedChange], writes: int
) -> None:
    """Distinct versions, one per change; the stored version is the last; one outbox row
    and (after the first) two history rows per change; history replayed in time order
    never adds a member twice nor removes a non-member, and ends at the stored state."""
    versions = sorted(a.state.version for a in applied)
    assert len(set(versions)) == writes
    assert (
        await db.fetchval("SELECT version FROM user_versions WHERE user_id = $1", uid)
        == (versions[-1])
    )
    assert await db.fetchval("SELECT count(*) FROM cache_outbox WHERE user_id = $1", uid) == writes
    await replayed_history(db, uid)
    # Whatever the order, the state answered for the newest version is the stored one.
    newest = max(applied, key=lambda a: a.state.version).state
    assert {m.segment_id for m in newest.memberships} == {
        r["segment_id"]
        for r in await db.fetch("SELECT segment_id FROM memberships WHERE user_id = $1", uid)
    }


async def test_a_hot_users_changes_in_one_process_take_turns(
    segments: Container, db: asyncpg.Connection
) -> None:
    """60 changes of one user at once: none conflicts (they take turns in the process),
    all apply, and they hold one pooled connection at a time, not 60."""
    store = segments.store
    conflicts, locked = store.change_conflicts, store.locked_changes
    store.in_use_peak = store.in_use
    applied = await asyncio.gather(*(apply(store, 5, i) for i in range(60)))
    await check_applied_once_each(db, 5, list(applied), 60)
    assert (store.change_conflicts, store.locked_changes) == (conflicts, locked)
    assert store.in_use_peak - store.in_use <= 1
    assert not store._turns  # nothing left behind


async def test_a_hot_users_changes_from_two_processes_all_apply_exactly(
    segments: Container, other_store: PgStore, db: asyncpg.Connection
) -> None:
    """Two pools (as two API processes) writing one user at once: their changes conflict
    on the user's version and are read again or take the row lock, and each applies
    exactly once."""
    stores = (segments.store, other_store)
    before = sum(s.change_conflicts for s in stores)
    applied = await asyncio.gather(*(apply(stores[i % 2], 6, i) for i in range(80)))
    await check_applied_once_each(db, 6, list(applied), 80)
    assert sum(s.change_conflicts for s in stores) > before  # the compare did its job


async def test_a_user_stuck_on_its_row_lock_holds_one_connection_and_blocks_no_one_else(
    segments: Container, settings: Settings, db: asyncpg.Connection
) -> None:
    """While another session holds the user's row, ten changes of that user wait: one
    on the row with a connection, nine for their turn without one; another user's change
    goes through meanwhile, and the ten apply once the row is free."""
    store = await PgStore.connect(settings.database_url, max_size=4, acquire_timeout=5.0)
    try:
        await apply(store, 7, 0)
        blocker = await asyncpg.connect(settings.database_url)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM user_versions WHERE user_id = 7 FOR UPDATE")
            waiting = [asyncio.ensure_future(apply(store, 7, i)) for i in range(1, 11)]
            await asyncio.sleep(0.3)
            assert store.in_use == 1
            started = time.monotonic()
            await apply(store, 8, 0)  # a pool of 4 still has room for others
            assert time.monotonic() - started < 1.5
            assert not any(w.done() for w in waiting)
            await tx.rollback()
        finally:
            await blocker.close()
        applied = list(await asyncio.gather(*waiting))
        assert len({a.state.version for a in applied}) == 10
        assert store.change_conflicts == 0
    finally:
        await store.close()


async def test_a_change_whose_turn_does_not_come_in_time_changes_nothing(
    segments: Container, settings: Settings, db: asyncpg.Connection
) -> None:
    """The wait for the user's turn counts toward the acquire timeout: past it the change
    is refused with 503 "nothing was changed" (and it did not commit), while the change
    ahead of it applies once the row is free."""
    store = await PgStore.connect(settings.database_url, max_size=4, acquire_timeout=0.5)
    try:
        await apply(store, 9, 0)
        blocker = await asyncpg.connect(settings.database_url)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM user_versions WHERE user_id = 9 FOR UPDATE")
            first = asyncio.ensure_future(apply(store, 9, 1))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as err:
                await apply(store, 9, 2)
            assert not isinstance(err.value, OutcomeUnknown)
            assert "nothing was changed" in err.value.message
            assert 0.4 < time.monotonic() - started < 1.5
            assert store.turn_timeouts == 1
            await tx.rollback()
        finally:
            await blocker.close()
        await first
        # The first change and the set-up: two of them, none of the refused one.
        assert await db.fetchval("SELECT count(*) FROM cache_outbox WHERE user_id = 9") == 2
        assert not store._turns
    finally:
        await store.close()
