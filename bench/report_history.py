"""History report benchmark: a month-wide report through the API, against COPY.

The month: 1,000,000 stored facts (memberships beginning and ending over 21 segments)
plus a percentage rule over 1,000,000 known users (rows in user_versions), created at
10 % on the 2nd and raised to 30 % on the 15th, so about 300,000 rule-driven rows are
derived at report time on top of the stored ones.

Ceiling, measured in the same run: PostgreSQL's own `COPY (SELECT ... ORDER BY
occurred_at) TO STDOUT WITH CSV` of the month's stored rows, as fast as those bytes can
leave the database.  The API runs as `segments serve` (one worker, its own process);
this process reads both.  Rounds alternate ceiling and API; the figure is the median
of the per-round ratios.

    .venv/bin/python -m bench.report_history [--facts 1000000] [--users 1000000]
        [--rounds 3] [--profile]

--profile also runs the report once in this process under cProfile (Python's share)
and prints where the time went.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import os
import pstats
import statistics
import time
from collections.abc import Iterator

import aiohttp
import asyncpg

from bench.stack import bench_stack, server
from devstack import free_port
from persistence.store import PgStore
from persistence.urls import asyncpg_url
from service.domain.reports import FORMULA_STARTS

SEGMENTS = 20  # plain segments, plus one rule segment


def previous_month(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    this = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC)
    start = (this - dt.timedelta(days=1)).replace(day=1)
    return start, this


async def seed(
    url: str, facts: int, users: int, start: dt.datetime, *, add_users: bool = True
) -> dict[str, int]:
    """The month's facts over ``users`` known users; ``add_users=False`` when those users
    are already in user_versions (bench/scale.py seeds them first)."""
    conn = await asyncpg.connect(url)
    before = start - dt.timedelta(days=1)
    ids = [
        r[0]
        for r in await conn.fetch(
            "INSERT INTO segments (slug, description, auto_bp, version, created_at)"
            " SELECT CASE WHEN g < $1 THEN 'SEGMENT_' || g ELSE 'ROLLOUT' END, '',"
            " CASE WHEN g < $1 THEN NULL ELSE 3000 END, nextval('change_id_seq'), $2"
            " FROM generate_series(0, $1) g ORDER BY g RETURNING id",
            SEGMENTS,
            before,
        )
    ]
    rollout = ids[-1]
    day = dt.timedelta(days=1)
    await conn.executemany(
        "INSERT INTO segment_history (segment_id, slug, occurred_at, operation, old_bp, new_bp)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [(sid, f"SEGMENT_{i}", before, "created", None, None) for i, sid in enumerate(ids[:-1])]
        + [
            (rollout, "ROLLOUT", before, "created", None, None),
            (rollout, "ROLLOUT", start + day, "rule_changed", None, 1000),
            (rollout, "ROLLOUT", start + 14 * day, "rule_changed", 1000, 3000),
        ],
    )
    if add_users:
        await conn.copy_records_to_table(
            "user_versions",
            records=((uid, uid) for uid in range(1, users + 1)),
            columns=["user_id", "version"],
        )
    # Facts: `pairs` (user, segment) pairs, each beginning, ending, beginning... in turn.
    pairs = max(1, facts * 2 // 5)
    span = 27 * 86_400

    def pair(p: int) -> tuple[int, int, str]:
        k = p % (SEGMENTS + 1)
        user = 1 + ((p // (SEGMENTS + 1)) * 53) % users
        return user, ids[k], "ROLLOUT" if k == SEGMENTS else f"SEGMENT_{k}"

    def rows() -> Iterator[tuple[dt.datetime, int, int, str, str, str, str]]:
        first = start + dt.timedelta(hours=1)
        for i in range(facts):
            user, sid, slug = pair(i % pairs)
            at = first + dt.timedelta(seconds=i * span / facts)
            yield (
                at,
                user,
                sid,
                slug,
                "add" if (i // pairs) % 2 == 0 else "remove",
                "api",
                "member",
            )

    await conn.copy_records_to_table(
        "membership_history",
        records=rows(),
        columns=["occurred_at", "user_id", "segment_id", "slug", "operation", "cause", "kind"],
    )
    # The pairs whose last fact is a beginning are members now.
    members = [p for p in range(min(pairs, facts)) if (facts - 1 - p) // pairs % 2 == 0]
    await conn.copy_records_to_table(
        "memberships",
        records=(pair(p)[:2] for p in members),
        columns=["user_id", "segment_id"],
    )
    await conn.execute("ANALYZE")
    await conn.close()
    return {"members": len(members), "rollout": rollout}


async def ceiling(url: str, start: dt.datetime, end: dt.datetime) -> tuple[float, int]:
    conn = await asyncpg.connect(url)
    sink = io.BytesIO()
    t = time.perf_counter()
    await conn.copy_from_query(
        "SELECT user_id, slug, operation, occurred_at FROM membership_history"
        " WHERE occurred_at >= $1 AND occurred_at < $2 ORDER BY occurred_at, id",
        start,
        end,
        output=sink,
        format="csv",
        delimiter=";",
    )
    elapsed = time.perf_counter() - t
    await conn.close()
    return elapsed, sink.getvalue().count(b"\n")


async def through_api(port: int, period: str) -> tuple[float, int, int]:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/reports/history", json={"period": period}) as r:
            url = (await r.json())["url"]
        t = time.perf_counter()
        lines = size = 0
        async with http.get(url) as r:  # the link alone, as a browser would
            assert r.status == 200, await r.text()
            async for chunk in r.content.iter_chunked(1 << 16):
                lines += chunk.count(b"\n")
                size += len(chunk)
        return time.perf_counter() - t, lines - 1, size


async def profile(url: str, start: dt.datetime, end: dt.datetime) -> None:
    """The report in this process under cProfile: Python's share of the time."""
    store = await PgStore.connect(asyncpg_url(url), min_size=1, max_size=2)
    size = 0

    async def sink(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    profiler = cProfile.Profile()
    t = time.perf_counter()
    cpu = time.process_time()
    profiler.enable()
    await store.history_csv(start, end, None, FORMULA_STARTS, sink)
    profiler.disable()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - t
    await store.close()
    print(f"in-process report: {wall:.2f}s wall, {cpu:.2f}s of this process's CPU")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(12)


async def main(facts: int, users: int, rounds: int, with_profile: bool) -> None:
    start, end = previous_month(dt.datetime.now(dt.UTC))
    period = start.strftime("%Y-%m")
    with bench_stack() as stack:
        t = time.perf_counter()
        seeded = await seed(stack.postgres.url, facts, users, start)
        print(
            f"seeded {facts:,} facts, {users:,} known users, {seeded['members']:,} members"
            f" in {time.perf_counter() - t:.1f}s (period {period})"
        )
        port = free_port()
        env = {
            **os.environ,
            **stack.env(),
            "SEGMENTS_LOG_LEVEL": "WARNING",
            "SEGMENTS_REPORT_SECRET": "bench-" + "x" * 26,
            # The report's own cost, not its shipped pace (SEGMENTS_REPORT_MAX_ROWS_PER_S,
            # a deliberate cap that leaves cores to reads).
            "SEGMENTS_REPORT_MAX_ROWS_PER_S": "0",
        }
        api = ["-m", "service.cli", "serve", "--port", str(port), "--workers", "1"]
        results = []
        with server(api, env, port):
            for n in range(rounds):
                ceil_s, ceil_rows = await ceiling(stack.postgres.url, start, end)
                api_s, api_rows, size = await through_api(port, period)
                assert ceil_rows == facts, (ceil_rows, facts)
                results.append((ceil_s, api_s))
                print(
                    f"round {n + 1}: ceiling {ceil_s:5.2f}s ({ceil_rows:,} rows)"
                    f"  API {api_s:5.2f}s ({api_rows:,} rows, {size / 1e6:.0f} MB)"
                    f"  ratio {api_s / ceil_s:.2f}x"
                )
        if with_profile:
            await profile(stack.postgres.url, start, end)
    ceil_s = statistics.median(c for c, _ in results)
    api_s = statistics.median(a for _, a in results)
    ratio = statistics.median(a / c for c, a in results)
    print(f"ceiling  COPY ... TO STDOUT CSV : {ceil_s:6.2f}s  {facts / ceil_s:>10,.0f} rows/s")
    print(f"API      GET report link (CSV)  : {api_s:6.2f}s  {api_rows / api_s:>10,.0f} rows/s")
    print(f"ratio API / ceiling time (median of {rounds}): {ratio:.2f}x  (target <= 3x)")
    print("(the API unpaced: as shipped, SEGMENTS_REPORT_MAX_ROWS_PER_S caps the download)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--facts", type=int, default=1_000_000, help="stored facts in the month")
    parser.add_argument("--users", type=int, default=1_000_000, help="known users")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile one report")
    a = parser.parse_args()
    asyncio.run(main(a.facts, a.users, a.rounds, a.profile))
