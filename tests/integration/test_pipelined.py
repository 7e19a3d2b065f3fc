"""The auto-pipelining client against a private Valkey server (paused and killed here)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis
from redis import exceptions as rexc

from cache.pipelined import _FLUSH_AT, PipelinedConnection, PipelinedPool
from devstack import EmbeddedValkey, free_port

TIMEOUT_S = 0.3
SLACK_S = 0.25


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    v = EmbeddedValkey(tmp_path_factory.mktemp("pipelined") / "v", free_port(), persistent=False)
    v.start()
    try:
        yield v
    finally:
        v.stop()


@pytest.fixture
async def conn(valkey: EmbeddedValkey) -> AsyncIterator[PipelinedConnection]:
    c = await PipelinedConnection.connect(valkey.url, timeout_s=2.0)
    await c.execute("FLUSHDB")
    yield c
    c.close()


@pytest.fixture
async def pool(valkey: EmbeddedValkey) -> AsyncIterator[PipelinedPool]:
    p = PipelinedPool(valkey.url, size=2, timeout_s=TIMEOUT_S)
    await p.connect()
    yield p
    p.close()


@pytest.fixture
async def raw_redis_py(valkey: EmbeddedValkey) -> AsyncIterator[redis.Redis]:
    """redis-py without response callbacks: its replies as parsed off the wire."""
    r = redis.Redis.from_url(valkey.url)
    r.response_callbacks.clear()
    yield r
    await r.aclose()


async def _until_up(pool: PipelinedPool, within_s: float = 5.0) -> float:
    """Poll until the pool answers again; returns how long it took."""
    start = time.monotonic()
    while True:
        try:
            assert await pool.execute("PING") == b"PONG"
            return time.monotonic() - start
        except (rexc.ConnectionError, rexc.TimeoutError):
            if time.monotonic() - start > within_s:
                raise
            await asyncio.sleep(0.02)


async def test_replies_equal_redis_py(conn: PipelinedConnection, raw_redis_py: redis.Redis) -> None:
    commands: list[tuple[bytes | str | int | float, ...]] = [
        ("SET", "k", "v"),
        ("GET", "k"),
        ("GET", "missing"),
        ("ZADD", "z", 1, "a", 2.5, "b", "+inf", "c"),
        ("ZRANGE", "z", 0, -1),
        ("ZRANGE", "z", 0, -1, "WITHSCORES"),
        ("ZRANGE", "z", "(1", "+inf", "BYSCORE"),
        ("SET", "é", b"\x00\xff"),
        ("GET", "é"),
    ]
    ours = [await conn.execute(*c) for c in commands]
    await conn.execute("FLUSHDB")
    theirs = [await raw_redis_py.execute_command(*c) for c in commands]
    # redis-py 8 pairs up WITHSCORES replies (even without response callbacks); we
    # return the flat wire reply.
    flat = ours[5]
    ours[5] = [[m, float(s)] for m, s in zip(flat[::2], flat[1::2], strict=True)]
    assert ours == theirs
    assert ours[:3] == [b"OK", b"v", None]
    assert ours[4] == [b"a", b"b", b"c"]
    assert flat == [b"a", b"1", b"b", b"2.5", b"c", b"inf"]


async def test_commands_of_one_loop_iteration_share_writes(conn: PipelinedConnection) -> None:
    transport = conn._transport
    assert transport is not None
    writes: list[int] = []
    real_write = transport.write
    transport.write = lambda data: (writes.append(len(data)), real_write(data))[1]  # type: ignore[method-assign]
    ping = len(b"*1\r\n$4\r\nPING\r\n")
    try:
        # Fewer than _FLUSH_AT: one write when the iteration ends.
        assert await asyncio.gather(*(conn.execute("PING") for _ in range(3))) == [b"PONG"] * 3
        assert writes == [3 * ping]
        writes.clear()
        # More: a write every _FLUSH_AT commands, the rest when the iteration ends.
        assert await asyncio.gather(*(conn.execute("PING") for _ in range(102))) == [b"PONG"] * 102
        assert writes == [_FLUSH_AT * ping] * (102 // _FLUSH_AT) + [102 % _FLUSH_AT * ping]
    finally:
        transport.write = real_write  # type: ignore[method-assign]


async def test_ten_thousand_concurrent_calls_keep_order(valkey: EmbeddedValkey) -> None:
    # This checks ordering, not timeouts: a generous timeout keeps a loaded machine
    # (10,000 replies queued behind each other) from failing it.
    pool = PipelinedPool(valkey.url, size=2, timeout_s=10.0)
    await pool.connect()
    try:
        await _keep_order(pool)
    finally:
        pool.close()


async def _keep_order(pool: PipelinedPool) -> None:
    n = 10_000
    await pool.execute("FLUSHDB")
    assert await asyncio.gather(*(pool.execute("INCRBY", f"c:{i}", i) for i in range(n))) == list(
        range(n)
    )
    got = await asyncio.gather(*(pool.execute("GET", f"c:{i}") for i in range(n)))
    assert got == [str(i).encode() for i in range(n)]


async def test_evalsha(conn: PipelinedConnection) -> None:
    sha = await conn.execute(
        "SCRIPT", "LOAD", "return {KEYS[1], ARGV[1], redis.call('GET', KEYS[1])}"
    )
    await conn.execute("SET", "k", "v")
    assert await conn.evalsha(sha.decode(), ["k"], [42]) == [b"k", b"42", b"v"]
    with pytest.raises(rexc.NoScriptError):
        await conn.evalsha("0" * 40, ["k"], [])


async def test_error_reply_leaves_the_connection_usable(conn: PipelinedConnection) -> None:
    await conn.execute("SET", "s", "not a number")
    with pytest.raises(rexc.ResponseError, match="not an integer"):
        await conn.execute("INCR", "s")
    # An error in the middle of a batch fails only its own caller.
    got = await asyncio.gather(
        conn.execute("SET", "n", 1),
        conn.execute("LPUSH", "s", "x"),
        conn.execute("INCR", "n"),
        return_exceptions=True,
    )
    assert got[0] == b"OK" and got[2] == 2
    assert isinstance(got[1], rexc.ResponseError) and "WRONGTYPE" in str(got[1])
    with pytest.raises(rexc.DataError):
        conn.execute("SET", "k", None)  # type: ignore[arg-type]
    assert await conn.execute("GET", "n") == b"2"
    assert conn.is_connected


async def test_cancelled_caller_does_not_shift_replies(conn: PipelinedConnection) -> None:
    await conn.execute("SET", "a", "1")
    await conn.execute("SET", "b", "2")
    first = asyncio.ensure_future(conn.execute("GET", "a"))
    second = conn.execute("GET", "b")
    first.cancel()
    assert await second == b"2"
    assert await conn.execute("GET", "a") == b"1"


async def test_big_values_round_trip(conn: PipelinedConnection) -> None:
    big = [os.urandom(1 << 20) for _ in range(3)]
    await asyncio.gather(*(conn.execute("SET", f"big:{i}", v) for i, v in enumerate(big)))
    got = await asyncio.gather(
        *(conn.execute("GET", f"big:{i}") for i in range(3)), conn.execute("PING")
    )
    assert got == [*big, b"PONG"]


async def test_paused_server_times_out_then_pool_recovers(
    valkey: EmbeddedValkey, pool: PipelinedPool
) -> None:
    assert await pool.execute("PING") == b"PONG"
    valkey.pause()
    try:
        start = time.monotonic()
        # Two calls: one per connection of the pool, so both time out and break.
        got = await asyncio.gather(
            pool.execute("PING"), pool.execute("PING"), return_exceptions=True
        )
        elapsed = time.monotonic() - start
        assert all(isinstance(e, rexc.TimeoutError) for e in got), got
        assert TIMEOUT_S - 0.01 <= elapsed < TIMEOUT_S + SLACK_S
        # Both connections are broken now: callers fail at once instead of waiting.
        start = time.monotonic()
        with pytest.raises(rexc.ConnectionError):
            await pool.execute("PING")
        assert time.monotonic() - start < 0.1
    finally:
        valkey.resume()
    assert await _until_up(pool) < 1.0


async def test_killed_server_fails_fast_and_pool_recovers_after_restart(
    valkey: EmbeddedValkey,
) -> None:
    pool = PipelinedPool(valkey.url, size=2, timeout_s=2.0)  # a long timeout: must not be hit
    await pool.connect()
    try:
        valkey.kill()
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(rexc.ConnectionError):
                await pool.execute("PING")
            assert time.monotonic() - start < 0.2
        await asyncio.to_thread(valkey.start)
        assert await _until_up(pool) < 1.0
        assert await pool.execute("SET", "after", "restart") == b"OK"
    finally:
        pool.close()
        await asyncio.to_thread(valkey.start)  # no-op when running; leaves it up for others


def test_works_on_uvloop(valkey: EmbeddedValkey) -> None:
    """The API workers run on uvloop, whose transports are not asyncio.Transport."""
    import uvloop

    async def run() -> list[object]:
        c = await PipelinedConnection.connect(valkey.url, timeout_s=1.0)
        try:
            return list(await asyncio.gather(c.execute("SET", "uv", "1"), c.execute("GET", "uv")))
        finally:
            c.close()

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(run()) == [b"OK", b"1"]
    finally:
        loop.close()
