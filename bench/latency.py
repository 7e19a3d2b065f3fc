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
import json
import os
import time
import uuid

import redis.asyncio as aioredis

from bench.openloop import ZipfUsers, start_open_loop
from bench.read_latency.jobs import TOKEN, Ctx
from bench.read_latency.population import PER_USER, seed
from bench.read_latency.services import BEFORE, Services
from bench.read_latency.state import StateResult, run_state
from bench.read_latency.table import report
from bench.stack import bench_stack
from devstack import EmbeddedStack, free_port
from service.bootstrap import build
from service.domain.reconcile import Reconciler
from service.settings import load_settings

STATES = ("idle", "scan", "rebuild", "ingest", "writes", "report")


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
