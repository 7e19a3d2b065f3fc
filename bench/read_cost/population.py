"""The benchmark's population: segments through the service, memberships by COPY, then
timed cache rebuilds and the memory they fill."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from bench.measure import median
from bench.stack import copy_users
from service.bootstrap import build
from service.settings import load_settings

SEGMENTS = 20
PER_USER = 5


async def seed(env: dict[str, str], users: int) -> dict[str, Any]:
    """Segments through the service, memberships by COPY, then timed cache rebuilds
    (unpaced: their capacity, not the shipped pace)."""
    container = await build(load_settings({**env, "SEGMENTS_REBUILD_MAX_USERS_PER_S": "0"}))
    try:
        for i in range(SEGMENTS):
            await container.segments.create_segment(f"SEG_{i}")
        ids = sorted((await container.store.registry()).segments)
        conn = await asyncpg.connect(env["SEGMENTS_DATABASE_URL"])
        await copy_users(conn, ids, users, PER_USER)
        # As a long-running database would be: hint bits set, statistics fresh.
        await conn.execute("VACUUM ANALYZE")
        await conn.close()
        # Three timed rebuilds, each after a flush: one sample on a shared machine is
        # as much noise as figure (232-323k in three runs of one day).  The median is
        # the figure.  Memory is measured on the first copy, made into an empty Redis
        # (after a FLUSHALL, Valkey may free the old copy lazily).
        redis = container.cache._r
        await redis.flushall()
        before = (await redis.info("memory"))["used_memory"]
        times: list[float] = []
        after = before
        for attempt in range(3):
            if attempt:
                await redis.flushall()
            started = time.perf_counter()
            assert await container.segments.rebuild_cache()
            times.append(time.perf_counter() - started)
            if not attempt:
                # The registry and meta keys are a few hundred bytes: the delta is users.
                after = (await redis.info("memory"))["used_memory"]
        rebuild_s = median(times)
        return {
            "rebuild_s": rebuild_s,
            "memberships_per_s": users * PER_USER / rebuild_s,
            "rebuild_rates": [users * PER_USER / t for t in times],
            "bytes_per_user": (after - before) / users,
        }
    finally:
        await container.close()
