"""What is sampled while a phase runs: the machine's CPU, the API's metrics (its own
write latency histogram, write conflicts, pool gauges), PostgreSQL's active backends and
what they wait on, and the users changed the most."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

WRITE_ROUTE = "/v1/users/{user_id}/segments"


def machine_cpu() -> tuple[float, float]:
    """(CPU seconds busy on all cores, seconds some task waited for a CPU: PSI)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    busy = (sum(fields[:8]) - idle) / tick
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().rsplit("total=", 1)[1]
        waited = int(some) / 1e6
    except (OSError, IndexError, ValueError):
        waited = math.nan
    return busy, waited


def conflicts(port: int) -> dict[str, float]:
    found = scrape(port, ("segments_user_write_conflicts_total",))
    return {k.split('kind="')[1].split('"')[0]: v for k, v in found.items()}


@dataclass
class Samples:
    n: int = 0
    waits: Counter[str] = field(default_factory=Counter)  # wait_event -> samples x backends
    lock_waiters_max: int = 0
    lock_waiters_sum: int = 0
    active_sum: int = 0
    pool_waiting_max: float = 0.0
    pool_in_use_max: float = 0.0


def sample_stack(dsn: str, api_port: int, stop: threading.Event, out: Samples) -> None:
    """PostgreSQL's active client backends every 20 ms (what they wait on) and the API's
    pool gauges every 250 ms, until ``stop``."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        next_scrape = 0.0
        try:
            while not stop.is_set():
                rows = await conn.fetch(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w"
                    " FROM pg_stat_activity WHERE state = 'active'"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                out.n += 1
                waiting = 0
                for r in rows:
                    out.waits[r["w"]] += 1
                    waiting += r["w"].startswith("Lock:")
                out.active_sum += len(rows)
                out.lock_waiters_sum += waiting
                out.lock_waiters_max = max(out.lock_waiters_max, waiting)
                if time.monotonic() >= next_scrape:
                    next_scrape = time.monotonic() + 0.25
                    gauges = await asyncio.to_thread(scrape, api_port, ("segments_db_pool_",))
                    out.pool_waiting_max = max(
                        out.pool_waiting_max, gauges.get("segments_db_pool_waiting", 0.0)
                    )
                    out.pool_in_use_max = max(
                        out.pool_in_use_max, gauges.get("segments_db_pool_in_use", 0.0)
                    )
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    asyncio.run(run())


def scrape(port: int, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The API's /metrics lines starting with one of ``prefixes`` (name{labels} -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # nosec B310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def write_histogram(port: int) -> dict[float, float]:
    """Cumulative bucket counts of the API's own latency for 2xx writes."""
    out: dict[float, float] = {}
    pattern = re.compile(r'le="([^"]+)"')
    for key, value in scrape(port, ("segments_http_request_seconds_bucket",)).items():
        if 'method="POST"' in key and f'route="{WRITE_ROUTE}"' in key and "2xx" in key:
            le = pattern.search(key)
            if le:
                out[float(le.group(1))] = value
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The bucket bound below which ``q`` of the phase's writes finished (server side)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return "n/a"
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * total:
            return "> 5 s" if math.isinf(bound) else f"<= {1000 * bound:g} ms"
    return "n/a"


@contextlib.contextmanager
def sampling(dsn: str, api_port: int) -> Iterator[Samples]:
    out = Samples()
    stop = threading.Event()
    thread = threading.Thread(target=sample_stack, args=(dsn, api_port, stop, out))
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


def hot_users(dsn: str, top: int = 5) -> list[tuple[int, int]]:
    """The users with the most history rows (= the most changes applied)."""
    import asyncpg

    async def run() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT user_id, count(*) FROM membership_history"
                " GROUP BY user_id ORDER BY 2 DESC LIMIT $1",
                top,
            )
        finally:
            await conn.close()
        return [(r[0], r[1]) for r in rows]

    return asyncio.run(run())
