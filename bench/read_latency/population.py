"""The benchmark's population: segments through the service, memberships and a month of
history by COPY, then the cache rebuilt."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator

import asyncpg

from bench.report_history import previous_month
from bench.stack import copy_users
from service.bootstrap import build
from service.settings import load_settings

SEGMENTS = 20
PER_USER = 5


async def seed(env: dict[str, str], users: int, facts: int) -> float:
    """Segments through the service, memberships and a month of history by COPY, then
    the cache rebuilt (unpaced: nothing is read yet); returns the rebuild's seconds."""
    container = await build(load_settings({**env, "SEGMENTS_REBUILD_MAX_USERS_PER_S": "0"}))
    try:
        for i in range(SEGMENTS):
            await container.segments.create_segment(f"SEG_{i}")
        registry = (await container.store.registry()).segments
        ids = sorted(registry)
        conn = await asyncpg.connect(env["SEGMENTS_DATABASE_URL"])
        await copy_users(conn, ids, users, PER_USER)
        start, _ = previous_month(dt.datetime.now(dt.UTC))
        span = 27 * 86_400

        def history() -> Iterator[tuple[dt.datetime, int, int, str, str, str, str]]:
            first = start + dt.timedelta(hours=1)
            for i in range(facts):
                sid = ids[i % SEGMENTS]
                yield (
                    first + dt.timedelta(seconds=i * span / facts),
                    1 + (i * 53) % users,
                    sid,
                    registry[sid].slug,
                    "add" if (i // users) % 2 == 0 else "remove",
                    "api",
                    "member",
                )

        await conn.copy_records_to_table(
            "membership_history",
            records=history(),
            columns=["occurred_at", "user_id", "segment_id", "slug", "operation", "cause", "kind"],
        )
        # As a long-running database would be: hint bits set, statistics fresh.
        await conn.execute("VACUUM ANALYZE")
        await conn.close()
        await container.cache._r.flushall()
        started = time.perf_counter()
        # A Redis timeout on a busy machine interrupts a rebuild; the service retries,
        # and so does the seeding.
        for _ in range(5):
            if await container.segments.rebuild_cache():
                return time.perf_counter() - started
            await asyncio.sleep(1)
        raise RuntimeError("the cache rebuild after seeding failed 5 times")
    finally:
        await container.close()
