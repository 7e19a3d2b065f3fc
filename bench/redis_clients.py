"""Hot-read EVALSHA throughput: redis-py asyncio vs. cache.pipelined (not a test).

    .venv/bin/python -m bench.redis_clients [seconds-per-client]

Starts a private in-memory Valkey, loads the service's read script and a few users,
then for each client runs rounds of 64 concurrent single-user reads (asyncio.gather)
for a few seconds and prints reads/s. One process, one event loop, like one worker.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from cache import keys
from cache.pipelined import PipelinedPool
from cache.redis_cache import _READ
from devstack import EmbeddedValkey, free_port

CONCURRENCY = 64
USERS = 1000


async def _measure(read: Callable[[int], Awaitable[Any]], seconds: float) -> float:
    async def one(uid: int) -> None:
        reply = await read(uid)
        assert reply is not None and len(reply) == 3, reply  # registry version + 2 segments

    for i in range(2000):  # warm up (connections, caches)
        await one(i % USERS)
    done, uid = 0, 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        await asyncio.gather(*(one((uid + j) % USERS) for j in range(CONCURRENCY)))
        uid += CONCURRENCY
        done += CONCURRENCY
    return done / (time.perf_counter() - start)


async def _run(url: str, seconds: float) -> None:
    r = redis.Redis.from_url(url, max_connections=CONCURRENCY)
    sha: str = await r.script_load(_READ)
    await r.hset(keys.META, mapping={"complete": 1, "registry": 7})
    for uid in range(USERS):
        await r.zadd(keys.user(uid), {"10": "+inf", "11": time.time() + 3600})
    arg = f"({time.time()!r}"

    results: dict[str, float] = {}
    results["redis-py asyncio, pool of 64"] = await _measure(
        lambda uid: r.evalsha(sha, 2, keys.META, keys.user(uid), arg), seconds
    )
    await r.aclose()
    for size in (1, 2):
        pool = PipelinedPool(url, size=size, timeout_s=1.0)
        await pool.connect()
        results[f"PipelinedPool, {size} connection(s)"] = await _measure(
            lambda uid, pool=pool: pool.evalsha(sha, [keys.META, keys.user(uid)], [arg]),
            seconds,
        )
        pool.close()

    base = next(iter(results.values()))
    print(f"EVALSHA reads, concurrency {CONCURRENCY}, {seconds:g} s each:")
    for name, ops in results.items():
        print(f"  {name:32s} {ops:10,.0f} ops/s  {ops / base:5.2f}x")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    with tempfile.TemporaryDirectory(prefix="segments-bench-") as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "v", free_port(), persistent=False)
        valkey.start()
        try:
            asyncio.run(_run(valkey.url, seconds))
        finally:
            valkey.stop()


if __name__ == "__main__":
    main()
