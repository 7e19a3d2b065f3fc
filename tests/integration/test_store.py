"""The PostgreSQL store against a real server."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from persistence.store import PgStore
from service.bootstrap import Container
from service.domain.errors import SegmentExists, SegmentNotFound
from service.domain.model import AddItem, UserChange
from tests.checks import replayed_history


@pytest.fixture
async def store(clean: Container) -> PgStore:
    return clean.store


def change(uid: int, add: list[str] = [], remove: list[str] = []) -> UserChange:  # noqa: B006
    return UserChange(uid, tuple(AddItem(s) for s in add), tuple(remove))


async def history(
    db: asyncpg.Connection, uid: int, by_time: bool = False
) -> list[tuple[str, str, str]]:
    order = "occurred_at, id" if by_time else "id"
    rows = await db.fetch(
        "SELECT slug, operation, cause FROM membership_history WHERE user_id = $1"
        f" ORDER BY {order}",  # nosec B608: one of two constant strings
        uid,
    )
    return [(r["slug"], r["operation"], r["cause"]) for r in rows]


async def test_change_writes_history_in_the_same_transaction(
    store: PgStore, db: asyncpg.Connection
) -> None:
    await store.create_segment("A", "", None)
    b = await store.create_segment("B", "", None)
    s1 = (await store.apply_change(change(1, ["A", "B"]), [None, None])).state
    s2 = (await store.apply_change(change(1, [], ["A"]), [])).state
    assert s2.version > s1.version
    assert len(s1.memberships) == 2
    assert [m.segment_id for m in s2.memberships] == [b.id]
    assert await history(db, 1) == [
        ("A", "add", "api"),
        ("B", "add", "api"),
        ("A", "remove", "api"),
    ]


async def test_unknown_slug_rolls_back_everything(store: PgStore, db: asyncpg.Connection) -> None:
    await store.create_segment("A", "", None)
    with pytest.raises(SegmentNotFound) as err:
        await store.apply_change(change(1, ["A", "X"], ["Y"]), [None, None])
    assert err.value.details == {"slugs": ["X", "Y"]}
    assert await db.fetchval("SELECT count(*) FROM memberships") == 0
    assert await db.fetchval("SELECT count(*) FROM user_versions") == 0
    assert await history(db, 1) == []


async def test_ids_are_never_reused(store: PgStore) -> None:
    first = await store.create_segment("A", "", None)
    with pytest.raises(SegmentExists):
        await store.create_segment("A", "", None)
    await store.delete_segment("A")
    second = await store.create_segment("A", "", None)
    assert second.id > first.id


async def test_registry_version_grows_with_every_segment_change(store: PgStore) -> None:
    v0 = (await store.registry()).version
    await store.create_segment("A", "", 1234)
    r1 = await store.registry()
    await store.delete_segment("A")
    r2 = await store.registry()
    assert v0 < r1.version < r2.version
    assert [e.auto_bp for e in r1.segments.values()] == [1234]
    assert r2.segments == {}


async def test_delete_racing_an_add_never_leaves_a_member(store: PgStore) -> None:
    for round_ in range(10):
        await store.create_segment("R", "", None)
        results = await asyncio.gather(
            store.apply_change(change(round_ + 1, ["R"]), [None]),
            store.delete_segment("R"),
            return_exceptions=True,
        )
        assert not isinstance(results[1], Exception)
        state = await store.user_state(round_ + 1)
        assert state.memberships == ()


async def test_concurrent_changes_of_one_user_apply_one_after_another(
    store: PgStore, db: asyncpg.Connection
) -> None:
    """They take turns in the process (conflicts between processes: test_hot_user.py),
    racing a segment change.  Each applies to the state the previous one left: versions
    are distinct, history replays (by time) into the stored state."""
    slugs = ["A", "B", "C", "D"]
    for slug in slugs:
        await store.create_segment(slug, "", None)
    changes = [
        change(9, [slugs[i % 4], slugs[(i + 1) % 4]], [slugs[(i + 2) % 4]]) for i in range(24)
    ]
    applied = await asyncio.gather(
        *(store.apply_change(c, [None] * len(c.add)) for c in changes),
        store.update_segment("C", description="racing", auto_bp=None, set_auto=False),
    )
    versions = [a.state.version for a in applied[:-1]]  # type: ignore[union-attr]
    assert len(set(versions)) == len(versions)
    assert await db.fetchval("SELECT version FROM user_versions WHERE user_id = 9") == max(versions)
    assert await db.fetchval("SELECT count(*) FROM cache_outbox WHERE user_id = 9") == 24
    await replayed_history(db, 9)


async def test_user_states_pages_through_everyone(store: PgStore) -> None:
    await store.create_segment("A", "", None)
    for uid in range(1, 26):
        await store.apply_change(change(uid, ["A"]), [None])
    await store.apply_change(change(13, [], ["A"]), [])
    seen = {s.user_id: s async for batch in store.user_states(7) for s in batch}
    assert list(seen) == list(range(1, 26))
    # A user left with nothing comes too, at its version (a rebuild writes it).
    assert seen[13].memberships == () and seen[13].version > seen[25].version


async def test_history_is_partitioned_by_month(db: asyncpg.Connection, store: PgStore) -> None:
    parts = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'membership_history'::regclass"
    )
    names = {p["relname"] for p in parts}
    month = await db.fetchval("SELECT to_char(now(), 'YYYYMM')")
    assert f"membership_history_{month}" in names
    assert "membership_history_default" in names
    await store.create_segment("A", "", None)
    await store.apply_change(change(1, ["A"]), [None])
    where = await db.fetchval("SELECT tableoid::regclass::text FROM membership_history LIMIT 1")
    assert where == f"membership_history_{month}"
