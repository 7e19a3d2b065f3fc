"""The ceilings measured beside each round: PostgreSQL's COPY of the same rows into a
table keyed like ``audience_members``, and pipelined ZADDs of as many members to Redis."""

from __future__ import annotations

import time

import asyncpg
import redis

from bench.measure import cpu_delta, cpu_seconds
from bench.stack import execute
from devstack import EmbeddedPostgres

SCRATCH = "bench_copy_ceiling"
REDIS_BATCH = 10_000
REDIS_KEY_MEMBERS = 1_000


async def copy_ceiling(
    pg: EmbeddedPostgres, ids: list[int], generation: int
) -> tuple[float, float]:
    """(seconds, PostgreSQL CPU seconds) for one COPY of every id."""
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(f"TRUNCATE {SCRATCH}")
        ordered = sorted(ids)
        pg0 = cpu_seconds(pg.pids)
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(
                SCRATCH,
                records=((generation, cid) for cid in ordered),
                columns=["generation", "customer_id"],
            )
        elapsed = time.perf_counter() - started
        return elapsed, cpu_delta(pg0, cpu_seconds(pg.pids))
    finally:
        await conn.close()


def redis_ceiling(url: str, ids: list[int], score: int) -> float:
    r = redis.Redis.from_url(url)
    try:
        keys = [f"bench:aud:{i}" for i in range(-(-len(ids) // REDIS_KEY_MEMBERS))]
        for i in range(0, len(keys), 1000):
            r.unlink(*keys[i : i + 1000])
        started = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for start in range(0, len(ids), REDIS_BATCH):
            for k in range(start, min(start + REDIS_BATCH, len(ids)), REDIS_KEY_MEMBERS):
                pipe.zadd(
                    keys[k // REDIS_KEY_MEMBERS],
                    dict.fromkeys(ids[k : k + REDIS_KEY_MEMBERS], score),
                )
            pipe.execute()
        elapsed = time.perf_counter() - started
        assert r.zcard(keys[-1]) > 0
        return elapsed
    finally:
        r.close()


async def prepare(dsn: str) -> None:
    await execute(
        dsn,
        f"CREATE TABLE {SCRATCH} (generation bigint NOT NULL, customer_id bigint NOT NULL,"
        " PRIMARY KEY (generation, customer_id))",
    )
