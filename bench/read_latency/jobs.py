"""The background jobs a state runs under the reads, each repeated back to back: version
scans, rebuilds after a flush, snapshot ingestion, month-wide reports."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.report_history import previous_month
from cache import keys
from devstack import EmbeddedStack
from service.bootstrap import Container
from service.domain.reconcile import Reconciler
from service.ingest.messages import snapshot
from service.settings import Settings

TOKEN = "bench-latency-token-0123456789"  # nosec B105: a throw-away local stack's
MERCHANT_ID = 42
SEGMENT_TYPE = "BENCH_LATENCY"
REBUILD_GIVE_UP_S = 90.0


@dataclass
class Ctx:
    stack: EmbeddedStack
    env: dict[str, str]
    settings: Settings
    port: int
    users: int
    audience: int
    container: Container
    redis: aioredis.Redis
    topic: str
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    reconciler: Reconciler | None = None


@dataclass
class Job:
    """A background job repeated until ``stop``; ``runs`` holds (start, end) epochs."""

    runs: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def repeat(self, stop: asyncio.Event, once: Callable[[], Awaitable[str]]) -> None:
        while not stop.is_set():
            began = time.time()
            self.started.set()
            note = await once()
            self.runs.append((began, time.time()))
            self.notes.append(note)

    def coverage(self, w0: float, w1: float) -> float:
        covered, edge = 0.0, w0
        for s, e in sorted(self.runs):
            s, e = max(s, edge), min(e, w1)
            if e > s:
                covered += e - s
                edge = e
        return covered / (w1 - w0)


async def scan_once(ctx: Ctx) -> str:
    assert ctx.reconciler is not None
    result = await ctx.reconciler.scan()
    return f"{result.users:,} users"


async def rebuild_once(ctx: Ctx, paced: bool) -> str:
    """``paced``: as shipped, the reconciler (this process) rebuilds while the API waits
    SEGMENTS_REBUILD_DELAY_S; else as before, the API rebuilds on its first read."""
    # ASYNC: a synchronous FLUSHALL of millions of keys blocks Valkey for a second or
    # more, which is the flush's own cost, not the rebuild's.
    await ctx.redis.flushall(asynchronous=True)
    started = time.monotonic()
    by = "the reconciler (this process)"
    if not paced:
        by = "the API"
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{ctx.port}/v1/users/1/segments",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as r,
        ):
            await r.read()  # the API starts the rebuild on a read of the incomplete copy
    # Else this process plays the reconciler, which takes the rebuild while the API
    # leaves it (SEGMENTS_REBUILD_DELAY_S) and answers reads from PostgreSQL.
    rebuilt = False
    if paced:
        # As the reconciler would on its next round: a rebuild interrupted by a Redis
        # timeout (its first calls meet the flush) starts again at once, rather than
        # leaving the rebuild to the API after SEGMENTS_REBUILD_DELAY_S.
        for _ in range(3):
            rebuilt = await ctx.container.segments.rebuild_cache()
            if rebuilt:
                break
            await asyncio.sleep(0.3)  # a failed rebuild releases its lease meanwhile
            if await ctx.redis.exists(keys.REBUILD_LEASE):
                break  # another process rebuilds
    if not rebuilt:
        by = by if not paced else "another process"
        while await ctx.redis.hget(keys.META, "complete") is None:
            await asyncio.sleep(0.05)
            if time.monotonic() - started > REBUILD_GIVE_UP_S:
                # Recorded, and completed here so that the next states can run.
                await ctx.container.segments.rebuild_cache()
                return f"NOT rebuilt by {by} in {REBUILD_GIVE_UP_S:.0f} s"
    return f"rebuilt by {by} in {time.monotonic() - started:.1f} s"


async def audience_version(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT customers, version FROM audiences WHERE merchant_id = $1 AND segment_type = $2",
        MERCHANT_ID,
        SEGMENT_TYPE,
    )
    return (0, 0) if row is None else (row["customers"], row["version"])


def encode_snapshot(ctx: Ctx) -> list[tuple[bytes, bytes]]:
    ids = ctx.rng.sample(range(1, 50 * ctx.audience + 1), ctx.audience)
    return snapshot(MERCHANT_ID, SEGMENT_TYPE, ids, 20, uuid.uuid4().hex)


def ingest_job(ctx: Ctx, ready: list[list[tuple[bytes, bytes]]]) -> Callable[[], Awaitable[str]]:
    async def once() -> str:
        messages = ready.pop() if ready else encode_snapshot(ctx)
        conn = await asyncpg.connect(ctx.env["SEGMENTS_DATABASE_URL"])
        producer = AIOKafkaProducer(
            bootstrap_servers=ctx.env["SEGMENTS_KAFKA_BOOTSTRAP"],
            acks="all",
            max_request_size=32 * 1024 * 1024,
        )
        try:
            _, before = await audience_version(conn)
            started = time.monotonic()
            await producer.start()
            for key, value in messages:
                await producer.send_and_wait(ctx.topic, value=value, key=key)
            published = time.monotonic() - started
            while True:
                customers, version = await audience_version(conn)
                if version > before and customers == ctx.audience:
                    break
                if time.monotonic() - started > 300:
                    raise RuntimeError("the snapshot was not ingested in 300 s")
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()
            await conn.close()
        return (
            f"{ctx.audience:,} in {time.monotonic() - started:.1f} s (published {published:.1f} s)"
        )

    return once


def report_job(ctx: Ctx) -> Callable[[], Awaitable[str]]:
    period = previous_month(dt.datetime.now(dt.UTC))[0].strftime("%Y-%m")

    async def once() -> str:
        base = f"http://127.0.0.1:{ctx.port}"
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(
                f"{base}/v1/reports/history",
                json={"period": period},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as r:
                assert r.status == 201, await r.text()
                url = (await r.json())["url"]
            started = time.monotonic()
            lines = 0
            async with http.get(url) as r:
                assert r.status == 200, await r.text()
                async for chunk in r.content.iter_chunked(1 << 16):
                    lines += chunk.count(b"\n")
        return f"{lines - 1:,} rows in {time.monotonic() - started:.1f} s"

    return once
