"""The cache rebuild at scale: the service's own ``rebuild_cache`` into an emptied Valkey,
its time, the memory it fills and the CPU it costs each party."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench.measure import own_cpu_seconds
from bench.scaling.cpu import cpu_snapshot, cpu_used
from service.bootstrap import Container, build
from service.settings import load_settings


@dataclass(frozen=True)
class Rebuild:
    users: int
    memberships: int
    seconds: float
    bytes_per_user: float
    cpu: dict[str, float]  # CPU seconds of each party during the rebuild
    failed_attempts: int
    retried_batches: int  # since the start of the run
    valkey_slow: list[str]  # Valkey's latency monitor: events over 100 ms

    @property
    def rate(self) -> float:
        return self.memberships / self.seconds


async def timed_rebuild(
    container: Container, admin: aioredis.Redis, users: int, per_user: int, pids: dict[str, int]
) -> Rebuild:
    """The service's rebuild into an emptied Valkey; memory is the used_memory delta
    (the registry and meta keys are a few hundred bytes: the delta is users).  A rebuild
    that gives up (a Valkey reply slower than the read timeout) is started again from
    an empty Valkey, at most twice, and counted."""
    for attempt in range(3):
        await admin.flushall()
        before = (await admin.info("memory"))["used_memory"]
        cpu0 = cpu_snapshot(pids)
        self0 = own_cpu_seconds()
        started = time.perf_counter()
        done = await container.segments.rebuild_cache()
        seconds = time.perf_counter() - started
        self1 = own_cpu_seconds()
        if done:
            break
        print(f"    rebuild attempt {attempt + 1} gave up after {seconds:.1f}s", flush=True)
        await asyncio.sleep(3)  # the service's connections reconnect
    else:
        raise RuntimeError("the cache rebuild did not complete in 3 attempts (see the log)")
    cpu = cpu_used(pids, cpu0)
    cpu["bench (rebuild code)"] = self1 - self0
    after = (await admin.info("memory"))["used_memory"]
    slow = await admin.latency_latest()
    await admin.latency_reset()
    return Rebuild(
        users,
        users * per_user,
        seconds,
        (after - before) / users,
        cpu,
        attempt,
        RETRIES.count,
        [f"{e[0]!r} max {e[3]!r} ms" for e in slow],
    )


class _Counter(logging.Handler):
    """Counts the rebuild's retried batch writes (the service logs each)."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "batch write failed" in record.getMessage():
            _Counter.count += 1


RETRIES = _Counter()


async def container_on(env: dict[str, str], redis_url: str) -> Container:
    # The rebuild's capacity: unpaced (SEGMENTS_REBUILD_MAX_USERS_PER_S, shipped at
    # 25,000 users/s, is a deliberate cap that leaves Redis to the reads).
    unpaced = {"SEGMENTS_REDIS_URL": redis_url, "SEGMENTS_REBUILD_MAX_USERS_PER_S": "0"}
    return await build(load_settings({**env, **unpaced}))
