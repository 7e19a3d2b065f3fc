"""The month-wide history report at scale, against PostgreSQL's COPY of the same rows."""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

from bench import report_history
from bench.scaling.reads import serve
from bench.scaling.sizes import history_partition_size
from bench.scaling.table import Phase, Row, mb
from devstack import free_port


async def measure_report(
    a: argparse.Namespace, env: dict[str, str], url: str, tmp: str, phase: Phase
) -> list[Row]:
    start, end = report_history.previous_month(dt.datetime.now(dt.UTC))
    period = start.strftime("%Y-%m")
    t = time.perf_counter()
    await report_history.seed(url, a.report_events, a.users, start, add_users=False)
    phase.mark(f"history: {a.report_events:,} facts seeded in {time.perf_counter() - t:.0f}s")
    name, heap, idx = await history_partition_size(url, start)
    port = free_port()
    # The link is asked for without a token, as bench/report_history.py does.
    report_env = {k: v for k, v in env.items() if k != "SEGMENTS_AUTH_TOKENS"}
    results: list[tuple[float, float]] = []
    with serve(report_env, port, Path(tmp) / "api-report.log"):
        for n in range(a.report_rounds):
            ceil_s, ceil_rows = await report_history.ceiling(url, start, end)
            api_s, api_rows, size = await report_history.through_api(port, period)
            assert ceil_rows == a.report_events, (ceil_rows, a.report_events)
            results.append((ceil_s, api_s))
            phase.mark(
                f"report round {n + 1}: COPY {ceil_s:.1f}s ({ceil_rows:,} rows),"
                f" API {api_s:.1f}s ({api_rows:,} rows, {mb(size)}), {api_s / ceil_s:.2f}x"
            )
    ratio = statistics.median(api / ceil for ceil, api in results)
    return [
        Row(
            f"history partition, {a.report_events:,} facts",
            f"{name}: heap {mb(heap)}, indexes {mb(idx)}"
            f" = {(heap + idx) / a.report_events:.0f} B/fact",
        ),
        Row(
            f"month-wide report, {a.report_events:,} facts, {a.users:,} known users",
            f"API {statistics.median(api for _, api in results):.1f} s ({api_rows:,} rows,"
            f" {mb(size)}) vs COPY {statistics.median(c for c, _ in results):.1f} s:"
            f" {ratio:.2f}x (median of {len(results)} alternating rounds)",
            "<= 3x COPY (the 1M-fact target)",
            ratio <= 3.0,
        ),
    ]
