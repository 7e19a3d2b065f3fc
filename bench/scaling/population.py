"""The scale run's population: its segments, and users loaded by COPY as a bulk load is."""

from __future__ import annotations

import time

import asyncpg

from service.bootstrap import build
from service.settings import load_settings

SEGMENTS = 20
# Users per COPY statement while loading: progress shows, and memory stays flat.
LOAD_CHUNK = 1_000_000


async def make_segments(env: dict[str, str]) -> list[int]:
    container = await build(load_settings(env))
    try:
        for i in range(SEGMENTS):
            await container.segments.create_segment(f"SEG_{i}")
        return sorted((await container.store.registry()).segments)
    finally:
        await container.close()


async def load_users(url: str, ids: list[int], first: int, last: int, per_user: int) -> float:
    """Users ``first..last`` with ``per_user`` memberships each, by COPY, as a bulk load
    is done: foreign-key triggers off for the session (the rows are valid by
    construction) and the secondary indexes built once after the rows are in (PostgreSQL
    sorts once instead of inserting 50 million keys one by one).  Returns seconds."""
    step = len(ids) // per_user
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("SET maintenance_work_mem = '512MB'")
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'memberships'"
            " AND indexname <> 'memberships_pkey'"
        )
        for index in indexes:
            await conn.execute(f'DROP INDEX "{index["indexname"]}"')
        for lo in range(first, last + 1, LOAD_CHUNK):
            hi = min(last, lo + LOAD_CHUNK - 1)
            await conn.copy_records_to_table(
                "memberships",
                records=(
                    (u, ids[(u + k * step) % len(ids)])
                    for u in range(lo, hi + 1)
                    for k in range(per_user)
                ),
                columns=["user_id", "segment_id"],
            )
            await conn.copy_records_to_table(
                "user_versions",
                records=((u, u) for u in range(lo, hi + 1)),
                columns=["user_id", "version"],
            )
            if last - first >= LOAD_CHUNK:
                print(f"    loaded users up to {hi:,} ({time.perf_counter() - started:.0f}s)")
        for index in indexes:
            await conn.execute(index["indexdef"])
        # As a long-running database would be: hint bits set, statistics fresh.
        await conn.execute("VACUUM ANALYZE memberships")
        await conn.execute("VACUUM ANALYZE user_versions")
    finally:
        await conn.close()
    return time.perf_counter() - started
