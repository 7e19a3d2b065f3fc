"""Read latency at a fixed rate while background work runs (issue 16, part 2).

    .venv/bin/python -m bench.latency [--users 1000000] [--rate 5000] [--seconds 20]
        [--states idle,scan,rebuild,ingest,writes,report]

One API worker (``segments serve``) as shipped: tokens configured (reads need one, as in
the deployment files), the default access log and log level.  1,000,000 users x 5
memberships (COPY, then the cache rebuilt), reads open-loop (bench/openloop.py) at
5,000/s over Zipf-skewed user ids, ``--seconds`` in each state:

1. idle;
2. scan: full reconciler version scans, back to back (``Reconciler.scan`` in this
   process, which plays the reconciler);
3. rebuild: FLUSHALL (ASYNC), then a cache rebuild by the reconciler (this process;
   the API leaves it to the reconciler for SEGMENTS_REBUILD_DELAY_S) while the API
   answers reads from PostgreSQL; again until the window is over;
4. ingest: a replace snapshot of 2,000,000 customers published to Kafka and ingested
   by ``segments consume``, again until the window is over;
5. writes: 500 POST /v1/users/{id}/segments a second on top, open-loop, half of them to
   the 1 % hottest users;
6. report: a month-wide history report of 1,000,000 rows downloaded, again and again.

``--compare`` also runs scan, rebuild, ingest and report as the service was before
their pacing, just before each (``STATE:before``: scan and ingestion unpaced; the report
with PostgreSQL's parallel workers; the rebuild started by the API at once, in its own process).

A background job must cover the whole read window: each job repeats back to back, and
the output gives the share of the window it covered.  Targets: idle p99 <= 2 ms; every
other state p99 <= 2x idle and p99.9 <= 25 ms, 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from bench.measure import cpu_seconds
from bench.openloop import OpenLoopResult, WriteMix, ZipfUsers, start_open_loop
from bench.stack import bench_stack, copy_users, server
from cache import keys
from devstack import EmbeddedStack, descendants, free_port
from service.bootstrap import Container, build
from service.domain.reconcile import Reconciler
from service.http.serving import HOT_ROUTE
from service.ingest.messages import snapshot
from service.settings import Settings, load_settings

SEGMENTS = 20
PER_USER = 5
TOKEN = "bench-latency-token-0123456789"  # nosec B105: a throw-away local stack's
MERCHANT_ID = 42
SEGMENT_TYPE = "BENCH_LATENCY"
STATES = ("idle", "scan", "rebuild", "ingest", "writes", "report")
IDLE_P99_MS = 2.0
P999_MS = 25.0
REBUILD_GIVE_UP_S = 90.0


# -- seeding ----------------------------------------------------------------------------


def previous_month(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    this = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC)
    return (this - dt.timedelta(days=1)).replace(day=1), this


async def seed(env: dict[str, str], users: int, facts: int) -> float:
    """Segments through the service, memberships and a month of history by COPY, then
    the cache rebuilt; returns the rebuild's seconds."""
    container = await build(load_settings(env))
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


# -- background jobs --------------------------------------------------------------------


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


# -- one state --------------------------------------------------------------------------


@dataclass
class StateResult:
    name: str
    reads: OpenLoopResult
    writes: OpenLoopResult | None
    coverage: float | None
    notes: list[str]
    cores: dict[str, float]
    # The API's own latency of the read (segments_http_request_seconds, from the handler's
    # start to its answer): the service without the generator and the kernel's queues.
    served: ServedLatency | None = None


def _pids(ctx: Ctx, api_pid: int, consumer_pid: int, gens: list[int]) -> dict[str, list[int]]:
    assert ctx.stack.valkey.pid is not None
    return {
        "API": [api_pid],
        "Valkey": [ctx.stack.valkey.pid],
        "PostgreSQL": ctx.stack.postgres.pids,
        "consumer": [consumer_pid, *descendants(consumer_pid)],
        "generators": gens,
        "bench": [os.getpid()],
    }


@dataclass(frozen=True)
class ServedLatency:
    """A window of the API's read-latency histogram: cumulative counts per bucket bound."""

    counts: dict[float, float]

    def minus(self, earlier: ServedLatency) -> ServedLatency:
        return ServedLatency({b: c - earlier.counts.get(b, 0.0) for b, c in self.counts.items()})

    def share_within(self, seconds: float) -> float:
        total = self.counts.get(math.inf, 0.0)
        return self.counts.get(seconds, 0.0) / total if total else 0.0

    def quantile_bound_ms(self, q: float) -> float:
        """The smallest bucket bound holding at least ``q`` of the reads (an upper bound
        of that quantile: the histogram has no finer resolution)."""
        total = self.counts.get(math.inf, 0.0)
        for bound in sorted(self.counts):
            if total and self.counts[bound] >= q * total:
                return bound * 1000
        return math.inf


async def served_latency(port: int) -> ServedLatency:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as r,
    ):
        text = await r.text()
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "segments_http_request_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_bucket")
                and labels.get("method") == "GET"
                and labels.get("route") == HOT_ROUTE
                and labels.get("status_class") == "2xx"
            ):
                counts[float(labels["le"])] = sample.value
    return ServedLatency(counts)


async def run_state(
    name: str, ctx: Ctx, a: argparse.Namespace, api_pid: int, consumer_pid: int, paced: bool
) -> StateResult:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    zipf = ZipfUsers(ctx.users)
    job: Job | None = None
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    once: Callable[[], Awaitable[str]] | None = None
    if name == "scan":
        once = lambda: scan_once(ctx)  # noqa: E731
    elif name == "rebuild":
        once = lambda: rebuild_once(ctx, paced)  # noqa: E731
    elif name == "ingest":
        ready = [await asyncio.to_thread(encode_snapshot, ctx) for _ in range(3)]
        once = ingest_job(ctx, ready)
    elif name == "report":
        once = report_job(ctx)
    if once is not None:
        job = Job()
        task = asyncio.create_task(job.repeat(stop, once))
        await job.started.wait()
    reads_gen = start_open_loop(
        "127.0.0.1", ctx.port, zipf, a.rate, a.seconds, headers, a.connections, seed=1
    )
    gens = [reads_gen.pid]
    writes_gen = None
    if name == "writes":
        writes_gen = start_open_loop(
            "127.0.0.1",
            ctx.port,
            WriteMix(zipf, [f"SEG_{i}" for i in range(SEGMENTS)]),
            a.write_rate,
            a.seconds,
            headers,
            16,
            seed=2,
        )
        gens.append(writes_gen.pid)
    pids = _pids(ctx, api_pid, consumer_pid, gens)
    before = {k: cpu_seconds(v) for k, v in pids.items()}
    served_before = await served_latency(ctx.port)
    t0 = time.monotonic()
    reads = await reads_gen.wait()
    writes = await writes_gen.wait() if writes_gen is not None else None
    elapsed = time.monotonic() - t0
    pids = _pids(ctx, api_pid, consumer_pid, gens)
    after = {k: cpu_seconds(v) for k, v in pids.items()}
    served = (await served_latency(ctx.port)).minus(served_before)
    # The generators are gone by now: their own figure is their CPU share.
    cores = {
        k: sum(t - before[k].get(p, 0.0) for p, t in after[k].items()) / elapsed
        for k in after
        if k != "generators"
    }
    cores["generators"] = reads.generator_cpu + (writes.generator_cpu if writes else 0.0)
    stop.set()
    coverage = None
    if task is not None and job is not None:
        await task
        coverage = job.coverage(reads.started_at, reads.started_at + a.seconds)
    return StateResult(name, reads, writes, coverage, job.notes if job else [], cores, served)


# -- main -------------------------------------------------------------------------------


def report(results: list[StateResult], a: argparse.Namespace, config: str) -> None:
    print(
        f"\nread latency at {a.rate:,.0f} reads/s open-loop (bench/openloop.py, from the"
        f" intended send time), {a.users:,} users x {PER_USER}, Zipf(0.99) ids,"
        f" {a.seconds:.0f} s a state"
    )
    print(f"config: {config}")
    idle = next((r for r in results if r.name == "idle"), None)
    head = (
        f"  {'state':<16} {'p50':>6} {'p99':>6} {'p99.9':>7} {'max':>7} {'errors':>6}  {'job':>6}"
    )
    print(head + "  cores: API Valkey PG consumer gen bench   verdict")
    for r in results:
        x = r.reads
        if r.name == "idle":
            ok = x.p99_ms <= IDLE_P99_MS and x.errors == 0
        else:
            limit = 2 * idle.reads.p99_ms if idle else float("inf")
            ok = x.p99_ms <= limit and x.p999_ms <= P999_MS and x.errors == 0
        covered = "-" if r.coverage is None else f"{r.coverage * 100:.0f}%"
        c = r.cores
        print(
            f"  {r.name:<16} {x.p50_ms:6.2f} {x.p99_ms:6.2f} {x.p999_ms:7.2f} {x.max_ms:7.1f}"
            f" {x.errors:>6}  {covered:>6}         {c['API']:.2f} {c['Valkey']:.2f}"
            f"   {c['PostgreSQL']:.2f} {c['consumer']:.2f}     {c['generators']:.2f} "
            f"{c['bench']:.2f}   {'ok' if ok else 'MISS'}"
            + ("  GENERATOR BEHIND" if x.behind else "")
        )
    print("  (ms; job = share of the read window the background job covered; cores = CPU s/s)")
    for r in results:
        x = r.reads
        print(
            f"  {r.name}: sent {x.sent:,} at {x.achieved_rate:,.0f}/s, generator send lag p99"
            f" {x.send_lag_p99_ms:.2f} ms; p99 per second: "
            + " ".join(f"{v:.1f}" for v in x.p99_per_second)
        )
        if r.served is not None:
            s = r.served
            print(
                f"    served (the API's own histogram): p99 <= {s.quantile_bound_ms(0.99):g} ms,"
                f" p99.9 <= {s.quantile_bound_ms(0.999):g} ms; within 1 ms"
                f" {s.share_within(0.001) * 100:.2f} %, 2 ms {s.share_within(0.002) * 100:.2f} %,"
                f" 5 ms {s.share_within(0.005) * 100:.2f} %"
            )
        if x.statuses:
            print(f"    statuses: {x.statuses}")
        if r.notes:
            shown = r.notes if len(r.notes) <= 4 else [*r.notes[:3], f"... {len(r.notes)} runs"]
            print(f"    job runs: {'; '.join(shown)}")
        if r.writes is not None:
            print(f"    writes: {r.writes.summary()}")


# ``STATE:before`` runs the state as the service was before its pacing: these settings
# (the rebuild: started by the API at once, in its own process).
BEFORE = {
    "scan": {"SEGMENTS_SCAN_MAX_USERS_PER_S": "0"},
    "rebuild": {"SEGMENTS_REBUILD_DELAY_S": "0", "SEGMENTS_REBUILD_MAX_USERS_PER_S": "0"},
    "ingest": {"SEGMENTS_INGEST_MAX_MEMBERS_PER_S": "0"},
    # The report's queries with the server's parallel workers, as before the setting.
    "report": {"SEGMENTS_REPORT_PARALLEL_WORKERS": "-1"},
}


class Services:
    """The API (``segments serve``) and the consumer (``segments consume``), restarted
    with other settings when a state asks for them."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path) -> None:
        self.env, self.port, self.log_dir = env, port, log_dir
        self.extra: dict[str, str] | None = None
        self._api: contextlib.ExitStack | None = None
        self.api_pid = self.consumer_pid = 0
        self._consumer: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, extra: dict[str, str]) -> None:
        self.stop()
        self.starts += 1
        env = {**self.env, **extra}
        self._api = contextlib.ExitStack()
        args = ["-m", "service.cli", "serve", "--port", str(self.port), "--workers", "1"]
        log = str(self.log_dir / f"api-{self.starts}.log")
        self.api_pid = self._api.enter_context(server(args, env, self.port, log)).pid
        consumer_log = self._api.enter_context(
            open(self.log_dir / f"consumer-{self.starts}.log", "wb")  # noqa: SIM115
        )
        # Our own interpreter and module, fixed arguments, no shell.
        self._consumer = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "service.cli", "consume"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=consumer_log,
        )
        self.consumer_pid = self._consumer.pid
        self.extra = extra

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.terminate()
            self._consumer.wait(15)
            self._consumer = None
        if self._api is not None:
            self._api.close()
            self._api = None

    def tail(self) -> None:
        for name in (f"api-{self.starts}.log", f"consumer-{self.starts}.log"):
            path = self.log_dir / name
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            print(f"--- last lines of {name}:", *lines[-30:], sep="\n", file=sys.stderr)


async def run_all(a: argparse.Namespace, stack: EmbeddedStack, env: dict[str, str]) -> None:
    t = time.perf_counter()
    rebuild_s = await seed(env, a.users, a.facts)
    print(
        f"seeded {a.users:,} users x {PER_USER} and {a.facts:,} history rows in"
        f" {time.perf_counter() - t:.0f} s (rebuild {rebuild_s:.1f} s)",
        flush=True,
    )
    port = free_port()
    container = await build(load_settings(env))
    redis = aioredis.from_url(env["SEGMENTS_REDIS_URL"])
    services = Services(env, port, stack.root)
    results: list[StateResult] = []
    ctx = Ctx(
        stack=stack,
        env=env,
        settings=container.settings,
        port=port,
        users=a.users,
        audience=a.audience,
        container=container,
        redis=redis,
        topic=env["SEGMENTS_KAFKA_TOPIC"],
    )
    try:
        for spec in a.state_list:
            name, _, variant = spec.partition(":")
            extra = BEFORE[name] if variant == "before" else {}
            if services.extra != extra:
                await asyncio.to_thread(services.start, extra)
                # Warm-up: connections, the registry, the hot keys.
                await start_open_loop(
                    "127.0.0.1",
                    port,
                    ZipfUsers(a.users),
                    a.rate,
                    3,
                    {"Authorization": f"Bearer {TOKEN}"},
                ).wait()
            ctx.reconciler = Reconciler(
                container.store,
                container.cache,
                container.segments,
                container.promos,
                scan_max_users_per_s=0 if variant else container.settings.scan_max_users_per_s,
            )
            result = await run_state(
                name, ctx, a, services.api_pid, services.consumer_pid, not variant
            )
            result.name = spec
            print(f"  {spec}: {result.reads.summary()}", flush=True)
            results.append(result)
            await asyncio.sleep(2)  # what the state left behind settles first
    except BaseException:
        services.tail()
        raise
    finally:
        await asyncio.to_thread(services.stop)
        await redis.aclose()
        await container.close()
    settings = load_settings(env)
    config = (
        "segments serve, 1 worker, uvloop; SEGMENTS_AUTH_TOKENS set (reads send a bearer"
        f" token), access log {settings.access_log!r} and log level {settings.log_level}"
        " (the defaults); pacing: scan"
        f" {settings.scan_max_users_per_s:,.0f} users/s, rebuild"
        f" {settings.rebuild_max_users_per_s:,.0f} users/s (batches of"
        f" {settings.rebuild_batch:,}), ingest {settings.ingest_max_members_per_s:,.0f} members/s"
        + "".join(f"; {k}={v}" for k, v in sorted(a.overrides.items()))
    )
    report(results, a, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--states",
        default=",".join(STATES),
        help=f"among {', '.join(STATES)}; STATE:before for {', '.join(BEFORE)} as before pacing",
    )
    parser.add_argument(
        "--compare", action="store_true", help="each paced state also run as before, just before"
    )
    parser.add_argument("--write-rate", type=float, default=500)
    parser.add_argument("--audience", type=int, default=2_000_000)
    parser.add_argument("--facts", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SEGMENTS_X=V",
        help="a setting for every process",
    )
    a = parser.parse_args()
    a.state_list = []
    for spec in a.states.split(","):
        name, _, variant = spec.partition(":")
        if name not in STATES or variant not in ("", "before") or (variant and name not in BEFORE):
            parser.error(f"unknown state {spec!r}; among {STATES}, or STATE:before")
        if a.compare and name in BEFORE and not variant:
            a.state_list.append(f"{name}:before")
        a.state_list.append(spec)
    a.overrides = dict(s.split("=", 1) for s in a.set)
    with bench_stack() as stack:
        env = {
            **os.environ,
            **stack.env(),
            "SEGMENTS_AUTH_TOKENS": json.dumps(
                {
                    "bench": {
                        "token": TOKEN,
                        "scopes": ["read", "write", "internal", "sync", "reports"],
                    }
                }
            ),
            "SEGMENTS_REPORT_SECRET": "bench-" + "x" * 26,
            "SEGMENTS_KAFKA_TOPIC": f"bench-latency-{uuid.uuid4().hex[:8]}",
            **a.overrides,
        }
        env["SEGMENTS_KAFKA_DLQ_TOPIC"] = env["SEGMENTS_KAFKA_TOPIC"] + ".dlq"
        for name in ("SEGMENTS_LOG_LEVEL", "SEGMENTS_ACCESS_LOG", "SEGMENTS_AUTH_OPEN_READS"):
            if name not in a.overrides:
                env.pop(name, None)  # the shipped defaults
        asyncio.run(run_all(a, stack, env))


if __name__ == "__main__":
    main()
