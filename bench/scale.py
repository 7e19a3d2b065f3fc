"""Ten million users on this machine: what the service costs and how it answers at scale.

    flock /tmp/segments-bench.lock .venv/bin/python -m bench.scale [--users 10000000]
        [--per-user 5] [--baseline-users 100000] [--rate 5000] [--seconds 15] [--rounds 3]
        [--report-events 10000000] [--report-rounds 2] [--skip-reads] [--skip-scan]
        [--skip-report]

One throw-away embedded stack (bench/stack.py).  Users 1..``baseline`` are loaded first
(memberships and user_versions by COPY, ``per-user`` memberships each over 20 segments,
as bench/read_path.py seeds) and copied into a second, small Valkey; then the rest up to
``users`` are loaded and the main Valkey is rebuilt from PostgreSQL.  Reported:

- cache rebuild of every user after a FLUSHALL (the service's own ``rebuild_cache``, in
  this process): time and memberships/s, with the baseline's rebuild in the same run;
- Valkey ``used_memory`` per user (the delta over the rebuild / users);
- PostgreSQL on disk per user: the database, and each table and index;
- ``segments serve`` start to ``/readyz`` answering 200 ``ready`` (cache complete);
- a full reconciler version scan (``Reconciler.scan``, what ``segments reconcile`` runs
  every ``SEGMENTS_SCAN_INTERVAL_S``), in this process: time, and the CPU it costs
  Valkey and PostgreSQL (from /proc);
- single-user reads at a fixed rate, open loop (bench/openloop.py, Zipf-skewed ids), one
  API worker with tokens configured as ``make run`` ships, p99: two servers, one on the
  full Valkey and one on the baseline's, measured in alternating rounds; the figure is
  the median of the per-round ratios;
- a month-wide history report of ``report-events`` stored facts over all the users
  (bench/report_history.py's seed and measurement), against PostgreSQL's ``COPY ... TO
  STDOUT`` of the same rows, alternating.

Valkey runs without persistence, as the deployment files run Redis (the serving copy is
rebuilt from PostgreSQL).  Not part of ``make test``: a full run takes about 15 minutes,
~1.2 GB of memory for Valkey and ~10 GB of disk in a temporary directory, removed at the
end with every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench.scaling.population import SEGMENTS, load_users, make_segments
from bench.scaling.reads import TOKEN, measure_reads
from bench.scaling.rebuild import RETRIES, container_on, timed_rebuild
from bench.scaling.report import measure_report
from bench.scaling.scan import measure_scan
from bench.scaling.sizes import pg_sizes
from bench.scaling.table import Phase, Row, mb, print_table
from bench.stack import bench_stack
from devstack import EmbeddedValkey, free_port


async def run(a: argparse.Namespace) -> list[Row]:
    phase = Phase()
    rows: list[Row] = []
    baseline = min(a.baseline_users, a.users)
    with bench_stack() as stack, tempfile.TemporaryDirectory(prefix="segments-scale-") as tmp:
        small = EmbeddedValkey(Path(tmp) / "valkey-small", free_port(), persistent=False)
        small.start()
        try:
            env = {
                **os.environ,
                **stack.env(),
                "SEGMENTS_REPORT_SECRET": "scale-" + "x" * 26,
                "SEGMENTS_AUTH_TOKENS": orjson.dumps(
                    {"bench": {"token": TOKEN, "scopes": ["read", "reports"]}}
                ).decode(),
            }
            url = stack.postgres.url
            # Admin connections with a long timeout: FLUSHALL and INFO of gigabytes.
            admin = aioredis.from_url(stack.valkey.url, socket_timeout=300)
            admin_small = aioredis.from_url(small.url, socket_timeout=300)
            # As the deployment files run Redis: no persistence, the copy is rebuilt.
            await admin.config_set("appendonly", "no")
            # Valkey's own record of stalls over 100 ms, to tell them from the client's.
            for client in (admin, admin_small):
                await client.config_set("latency-monitor-threshold", "100")
            logging.getLogger("service.domain.service").addHandler(RETRIES)
            pids = {"valkey": stack.valkey.pid or 0, "postgres": stack.postgres.pid or 0}
            ids = await make_segments(env)

            load_s = await load_users(url, ids, 1, baseline, a.per_user)
            phase.mark(f"loaded {baseline:,} users x {a.per_user} in {load_s:.1f}s")
            small_container = await container_on(env, small.url)
            try:
                base = await timed_rebuild(
                    small_container,
                    admin_small,
                    baseline,
                    a.per_user,
                    {**pids, "valkey": small.pid or 0},
                )
            finally:
                await small_container.close()
            phase.mark(f"baseline rebuild: {base.seconds:.2f}s, {base.rate:,.0f} memberships/s")

            if a.users > baseline:
                load_s = await load_users(url, ids, baseline + 1, a.users, a.per_user)
                rows_loaded = (a.users - baseline) * a.per_user
                phase.mark(
                    f"loaded users {baseline + 1:,}..{a.users:,} in {load_s:.1f}s"
                    f" ({rows_loaded / load_s:,.0f} memberships/s with the indexes)"
                )
                rows.append(
                    Row(
                        "load by COPY (+ indexes, VACUUM ANALYZE)",
                        f"{load_s:.0f} s, {rows_loaded / load_s:,.0f} memberships/s",
                    )
                )
            container = await container_on(env, stack.valkey.url)
            try:
                big = await timed_rebuild(container, admin, a.users, a.per_user, pids)
                phase.mark(f"rebuild: {big.seconds:.1f}s, {big.rate:,.0f} memberships/s")
                cpu = ", ".join(f"{k} {v:.0f} s" for k, v in big.cpu.items())
                rows.append(
                    Row(
                        f"cache rebuild, {a.users:,} users x {a.per_user}",
                        f"{big.seconds:.1f} s = {big.rate:,.0f} memberships/s (CPU: {cpu});"
                        f" {baseline:,} users in the same run: {base.rate:,.0f}/s"
                        + (
                            f"; {big.failed_attempts} earlier attempt(s) gave up"
                            if big.failed_attempts
                            else ""
                        )
                        + f"; batch writes retried: {big.retried_batches}"
                        + f"; Valkey stalls > 100 ms: {', '.join(big.valkey_slow) or 'none'}",
                        ">= 300,000/s",
                        big.rate >= 300_000,
                    )
                )
                rows.append(
                    Row(
                        "Valkey used_memory per user",
                        f"{big.bytes_per_user:.1f} B ({mb(big.bytes_per_user * a.users)});"
                        f" {baseline:,} users: {base.bytes_per_user:.1f} B",
                        "<= 130 B",
                        big.bytes_per_user <= 130,
                    )
                )
                sizes = await pg_sizes(url)
                phase.mark("sizes: " + ", ".join(f"{k.strip()} {mb(v)}" for k, v in sizes.items()))
                rows.append(
                    Row(
                        "PostgreSQL on disk per user",
                        f"{sizes['database'] / a.users:.0f} B ({mb(sizes['database'])} in all): "
                        + "; ".join(
                            f"{k.strip()} {v / a.users:.0f}"
                            for k, v in sizes.items()
                            if k != "database"
                        ),
                    )
                )

                if not a.skip_reads:
                    rows += await asyncio.to_thread(
                        measure_reads, a, env, small.url, stack.valkey.url, tmp, baseline, phase
                    )

                if not a.skip_scan:
                    rows.append(await measure_scan(container, pids, phase))
            finally:
                await container.close()

            if not a.skip_report:
                rows += await measure_report(a, env, url, tmp, phase)
            await admin.aclose()
            await admin_small.aclose()
        finally:
            small.stop()
    phase.mark("done; stack stopped")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--per-user", type=int, default=5, help=f"memberships (<= {SEGMENTS})")
    parser.add_argument("--baseline-users", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=5000, help="reads/s, open loop")
    parser.add_argument("--seconds", type=float, default=15, help="per read round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating read rounds")
    parser.add_argument("--report-events", type=int, default=10_000_000)
    parser.add_argument("--report-rounds", type=int, default=2)
    parser.add_argument("--skip-reads", action="store_true")
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--skip-report", action="store_true")
    a = parser.parse_args()
    if not 1 <= a.per_user <= SEGMENTS:
        parser.error(f"--per-user must be 1..{SEGMENTS}")
    free = shutil.disk_usage(tempfile.gettempdir()).free
    need = a.users * 900 + a.report_events * 250  # rough: data, indexes, WAL, sort spill
    if free < need:
        parser.error(f"needs about {need / 1e9:.0f} GB free in {tempfile.gettempdir()}")
    started = time.monotonic()
    rows = asyncio.run(run(a))
    print_table(a, rows, time.monotonic() - started)


if __name__ == "__main__":
    main()
