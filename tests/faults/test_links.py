"""Slow and broken links to Redis and PostgreSQL, through a fault-injecting TCP proxy.

Reads stay correct and within the configured timeouts; writes never half-apply, and
an error says only what is known ("nothing changed" only where it is certain); the
service recovers when the link does.  The service under test is a container whose
store URLs go through ``tests/faults/proxy.py``; checks read PostgreSQL directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from service.bootstrap import Container, build
from service.domain.errors import OutcomeUnknown, StorageUnavailable
from service.domain.service import AddRequest
from service.settings import Settings
from tests.faults.proxy import FaultProxy

# Short timeouts keep the stalls short; the server-side ones follow (persistence/store/pool.py).
DB_TIMEOUT_S = 1.5
REDIS_TIMEOUT_S = 0.25


def _via(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Linked:
    def __init__(self, c: Container, pg: FaultProxy, redis: FaultProxy) -> None:
        self.c, self.pg, self.redis = c, pg, redis


@pytest.fixture
async def linked(settings: Settings, clean: Container) -> AsyncIterator[Linked]:
    pg_url, redis_url = urlsplit(settings.database_url), urlsplit(settings.redis_url)
    assert pg_url.hostname and pg_url.port and redis_url.hostname and redis_url.port
    pg = await FaultProxy(pg_url.hostname, pg_url.port).start()
    redis = await FaultProxy(redis_url.hostname, redis_url.port).start()
    proxied = msgspec.structs.replace(
        settings,
        database_url=_via(settings.database_url, pg),
        redis_url=_via(settings.redis_url, redis),
        db_command_timeout_s=DB_TIMEOUT_S,
        redis_timeout_s=REDIS_TIMEOUT_S,
    )
    c = await build(proxied)
    await c.segments.create_segment("S")
    try:
        yield Linked(c, pg, redis)
    finally:
        pg.heal()
        redis.heal()
        await c.close()
        await pg.stop()
        await redis.stop()


async def _timed_read(c: Container, uid: int) -> tuple[list[str], float]:
    started = time.monotonic()
    answer = await c.segments.user_segments(uid)
    return answer, time.monotonic() - started


async def _state_is_whole(db: asyncpg.Connection, uid: int) -> bool:
    """Membership, history and version of a user agree: all of a change or none."""
    members = await db.fetchval("SELECT count(*) FROM memberships WHERE user_id = $1", uid)
    history = await db.fetchval("SELECT count(*) FROM membership_history WHERE user_id = $1", uid)
    version = await db.fetchval("SELECT version FROM user_versions WHERE user_id = $1", uid)
    return (members, history, version is not None) in ((0, 0, False), (1, 1, True))


async def test_redis_latency_keeps_reads_correct_and_fast(linked: Linked) -> None:
    c = linked.c
    assert await c.segments.update_user(1, [AddRequest("S")], []) == ["S"]
    linked.redis.latency_s = 0.05  # per chunk and direction: a 100 ms round trip
    for _ in range(20):
        answer, took = await _timed_read(c, 1)
        assert answer == ["S"]
        assert took < REDIS_TIMEOUT_S + 0.5
    linked.redis.latency_s = 0.2  # beyond the timeout: reads fall back, still right
    answer, took = await _timed_read(c, 1)
    assert answer == ["S"] and took < REDIS_TIMEOUT_S + 1.0


async def test_redis_stalled_mid_reply_or_half_open_reads_fall_back_then_recover(
    linked: Linked,
) -> None:
    c = linked.c
    await c.segments.update_user(2, [AddRequest("S")], [])
    assert await c.segments.user_segments(2) == ["S"]
    linked.redis.stall_replies()
    before = c.segments.reads_from_store
    for _ in range(10):
        answer, took = await _timed_read(c, 2)
        assert answer == ["S"]
        assert took < REDIS_TIMEOUT_S + 1.0
    assert c.segments.reads_from_store > before
    # A write while Redis does not answer still commits; its reads come from PostgreSQL.
    assert await c.segments.update_user(3, [AddRequest("S")], []) == ["S"]
    assert await c.segments.user_segments(3) == ["S"]
    linked.redis.heal()
    linked.redis.reset()  # the stalled connections are dropped, as a timeout would
    deadline = time.monotonic() + 10
    while True:
        from_cache = c.segments.reads_from_cache
        assert await c.segments.user_segments(3) == ["S"]
        if c.segments.reads_from_cache > from_cache:
            break  # back on Redis, with the write that was made meanwhile
        assert time.monotonic() < deadline, "reads never went back to Redis"
        await asyncio.sleep(0.1)


async def test_redis_reset_mid_stream_keeps_every_read_correct(linked: Linked) -> None:
    c = linked.c
    for uid in range(10, 20):
        await c.segments.update_user(uid, [AddRequest("S")], [])

    async def resets() -> None:
        for _ in range(5):
            await asyncio.sleep(0.02)
            linked.redis.reset()

    reads = [c.segments.user_segments(10 + i % 10) for i in range(300)]
    answers, _ = await asyncio.gather(asyncio.gather(*reads), resets())
    assert answers == [["S"]] * 300


async def test_postgres_latency_writes_and_reads_stay_right(
    linked: Linked, db: asyncpg.Connection
) -> None:
    c = linked.c
    linked.pg.latency_s = 0.05
    for uid in range(30, 35):
        assert await c.segments.update_user(uid, [AddRequest("S")], []) == ["S"]
    assert await db.fetchval("SELECT count(*) FROM memberships WHERE user_id >= 30") == 5


async def test_postgres_reset_mid_stream_never_half_applies_and_errors_tell_the_truth(
    linked: Linked, db: asyncpg.Connection
) -> None:
    c = linked.c
    told: dict[int, str] = {}

    async def write(uid: int) -> None:
        try:
            await c.segments.update_user(uid, [AddRequest("S")], [])
            told[uid] = "ok"
        except OutcomeUnknown:
            told[uid] = "unknown"
        except StorageUnavailable:
            told[uid] = "nothing"

    async def resets() -> None:
        for _ in range(8):
            await asyncio.sleep(0.03)
            linked.pg.reset()

    await asyncio.gather(asyncio.gather(*(write(uid) for uid in range(100, 160))), resets())
    assert set(told.values()) - {"ok", "unknown", "nothing"} == set()
    assert "nothing" in told.values() or "unknown" in told.values(), told  # faults landed
    for uid, verdict in told.items():
        assert await _state_is_whole(db, uid), uid
        applied = await db.fetchval("SELECT count(*) FROM memberships WHERE user_id = $1", uid)
        if verdict == "ok":
            assert applied == 1, uid
        elif verdict == "nothing":
            assert applied == 0, uid
    # The link is back: every write goes through (a retry of an unknown one is safe).
    for uid in told:
        assert await c.segments.update_user(uid, [AddRequest("S")], []) == ["S"]


async def test_postgres_half_open_gives_503_within_the_timeouts_then_recovers(
    linked: Linked, db: asyncpg.Connection
) -> None:
    c = linked.c
    linked.pg.stall_replies()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as err:
        await c.segments.update_user(200, [AddRequest("S")], [])
    took = time.monotonic() - started
    # A command timeout, or waiting for a free connection, and no more.
    assert took < DB_TIMEOUT_S + 2.5, took
    linked.pg.heal()
    linked.pg.reset()
    await asyncio.sleep(0.2)
    applied = await db.fetchval("SELECT count(*) FROM memberships WHERE user_id = 200")
    assert await _state_is_whole(db, 200)
    if not isinstance(err.value, OutcomeUnknown):
        assert applied == 0  # "nothing changed" must be true
    deadline = time.monotonic() + 10
    while True:
        try:
            assert await c.segments.update_user(200, [AddRequest("S")], []) == ["S"]
            break
        except StorageUnavailable:
            assert time.monotonic() < deadline, "the service did not recover with the link"
            await asyncio.sleep(0.2)


async def test_a_write_waiting_on_a_lock_is_aborted_by_postgres_and_says_so(
    linked: Linked, db: asyncpg.Connection, settings: Settings
) -> None:
    """A client-side timeout cannot know whether the server went on to commit (the probe
    saw 3 of 3 such writes commit); PostgreSQL's own lock_timeout aborts the write
    first, so "nothing changed" is the truth."""
    c = linked.c
    await c.segments.update_user(300, [AddRequest("S")], [])
    blocker = await asyncpg.connect(settings.database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM user_versions WHERE user_id = 300 FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as err:
            await c.segments.update_user(300, [], ["S"])
        assert not isinstance(err.value, OutcomeUnknown)
        assert "nothing was changed" in err.value.message
        assert time.monotonic() - started < DB_TIMEOUT_S
        await asyncio.sleep(DB_TIMEOUT_S)  # past the client's own timeout, too
        await tx.rollback()
    finally:
        await blocker.close()
    await asyncio.sleep(0.2)
    # Still a member: the refused removal did not commit behind the caller's back.
    assert await db.fetchval("SELECT count(*) FROM memberships WHERE user_id = 300") == 1
    assert await c.segments.update_user(300, [], ["S"]) == []
