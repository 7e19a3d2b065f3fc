"""One state measured: its background job started, reads (and writes) open-loop for the
window, the CPU each party used and the API's own latency over it."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.measure import cpu_seconds
from bench.openloop import OpenLoopResult, WriteMix, ZipfUsers, start_open_loop
from bench.read_latency.jobs import (
    TOKEN,
    Ctx,
    Job,
    encode_snapshot,
    ingest_job,
    rebuild_once,
    report_job,
    scan_once,
)
from bench.read_latency.population import SEGMENTS
from bench.read_latency.served import ServedLatency, served_latency
from devstack import descendants


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
