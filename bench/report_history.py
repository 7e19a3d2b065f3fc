"""History report benchmark: a month of 1,000,000 events as CSV through the API.

Ceiling, measured in the same run: PostgreSQL's own `COPY (SELECT ...) TO STDOUT WITH
CSV` of the same rows, which is as fast as those bytes can leave the database.

    .venv/bin/python -m bench.report_history [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import time

import aiohttp
import asyncpg
from aiohttp.test_utils import TestServer

from bench.stack import bench_stack
from service.bootstrap import api_app, build
from service.settings import load_settings


async def seed(url: str, rows: int, month: dt.datetime) -> None:
    conn = await asyncpg.connect(url)
    span = 27 * 86400
    records = (
        (
            month + dt.timedelta(seconds=i * span / rows),
            1000 + i % 50_000,
            i % 20 + 1,
            f"SEGMENT_{i % 20}",
            "add" if i % 3 else "remove",
            "api",
        )
        for i in range(rows)
    )
    await conn.copy_records_to_table(
        "membership_history",
        records=records,
        columns=["occurred_at", "user_id", "segment_id", "slug", "operation", "cause"],
    )
    await conn.execute("ANALYZE membership_history")
    await conn.close()


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


async def through_api(env: dict[str, str], period: str) -> tuple[float, int, int]:
    container = await build(load_settings(env))
    app = api_app(container)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                server.make_url("/v1/reports/history"), json={"period": period}
            ) as r:
                url = (await r.json())["url"]
            t = time.perf_counter()
            lines = size = 0
            async with http.get(url) as r:
                async for chunk in r.content.iter_chunked(1 << 16):
                    lines += chunk.count(b"\n")
                    size += len(chunk)
            return time.perf_counter() - t, lines - 1, size
    finally:
        await server.close()
        await container.close()


async def main(rows: int) -> None:
    month = dt.datetime(
        dt.datetime.now(dt.UTC).year, dt.datetime.now(dt.UTC).month, 1, tzinfo=dt.UTC
    )
    end = (month + dt.timedelta(days=32)).replace(day=1)
    with bench_stack() as stack:
        t = time.perf_counter()
        await seed(stack.postgres.url, rows, month)
        print(f"seeded {rows:,} history rows in {time.perf_counter() - t:.1f}s")
        ceil_s, ceil_rows = await ceiling(stack.postgres.url, month, end)
        api_s, api_rows, size = await through_api(stack.env(), month.strftime("%Y-%m"))
    assert api_rows == ceil_rows == rows, (api_rows, ceil_rows, rows)
    print(f"ceiling  COPY ... TO STDOUT CSV : {ceil_s:6.2f}s  {rows / ceil_s:>10,.0f} rows/s")
    print(
        f"API      GET report link (CSV)  : {api_s:6.2f}s  {rows / api_s:>10,.0f} rows/s"
        f"  ({size / 1e6:.0f} MB)"
    )
    print(f"ratio API / ceiling time        : {api_s / ceil_s:6.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().rows))
