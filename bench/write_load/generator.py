"""The open-loop write generator (run as a process of its own by ``bench.write_tail
--generate``): writes at fixed intended times, latency counted from those times."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter

from bench.measure import percentile

TOKEN = "bench-write-tail-token-0123456789"
SEGMENTS = [f"LOAD_{i}" for i in range(20)]


def pick_user(rng: random.Random, dist: str, users: int) -> int:
    if dist == "pareto":
        return min(users, int(rng.paretovariate(1.2)))
    if dist == "one":
        return 1
    # "hot": half of the writes to the hottest 1 % of the ids, the rest uniform.
    hot = max(1, users // 100)
    if rng.random() < 0.5:
        return rng.randint(1, hot)
    return rng.randint(1, users)


async def generate(
    port: int, rate: float, seconds: float, dist: str, users: int
) -> dict[str, object]:
    """Send ``rate`` writes/s for ``seconds`` at fixed intended times; latency counts from
    the intended time, so a late send (generator or connection queue) is not hidden."""
    import aiohttp

    rng = random.Random(7)
    url = f"http://127.0.0.1:{port}/v1/users/%d/segments"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: list[float] = []
    others: list[float] = []  # of writes to users other than user 1
    send_lag: list[float] = []
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(intended: float, uid: int, body: bytes) -> None:
            send_lag.append(time.perf_counter() - intended)
            try:
                async with session.post(url % uid, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors[str(resp.status)] += 1
            except Exception as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - intended)
            if uid != 1:
                others.append(latencies[-1])

        tasks = []
        start = time.perf_counter() + 0.2
        total = int(rate * seconds)
        for i in range(total):
            intended = start + i / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            add, remove = rng.sample(SEGMENTS, 2)
            body = json.dumps({"add": [add], "remove": [remove]}).encode()
            tasks.append(asyncio.ensure_future(one(intended, pick_user(rng, dist, users), body)))
        await asyncio.gather(*tasks)
    latencies.sort()
    others.sort()
    send_lag.sort()
    return {
        "sent": total,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "p999_ms": 1000 * percentile(latencies, 0.999),
        "max_ms": 1000 * latencies[-1] if latencies else math.nan,
        "others_p99_ms": 1000 * percentile(others, 0.99),
        "send_lag_p99_ms": 1000 * percentile(send_lag, 0.99),
        "errors": dict(errors),
    }
