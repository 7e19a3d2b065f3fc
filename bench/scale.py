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
import contextlib
import datetime as dt
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import redis.asyncio as aioredis

from bench import report_history
from bench.measure import cpu_delta, cpu_seconds
from bench.openloop import OpenLoopResult, ZipfUsers, run_open_loop
from bench.stack import bench_stack
from devstack import EmbeddedValkey, descendants, free_port
from service.bootstrap import Container, build
from service.settings import load_settings

SEGMENTS = 20
# Users per COPY statement while loading: progress shows, and memory stays flat.
LOAD_CHUNK = 1_000_000
TOKEN = "scale-bench-read-token-0123456789"  # nosec B105: a throw-away stack's token


@dataclass
class Phase:
    """Wall time of each phase, printed as it goes (the whole must fit in 30 minutes)."""

    started: float = field(default_factory=time.monotonic)

    def mark(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)


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


# -- loading ------------------------------------------------------------------------------


async def make_segments(env: dict[str, str]) -> list[int]:
    container = await build(load_settings(env))
    try:
        for i in range(SEGMENTS):
            await container.segments.create_segment(f"SEG_{i}")
        return sorted((await container.store.registry()).segments)
    finally:
        await container.close()


async def load_users(url: str, ids: list[int], first: int, last: int, per_user: int) -> float:
    """Users ``first..last`` with ``per_user`` memberships each, by COPY, as a bulk load
    is done: foreign-key triggers off for the session (the rows are valid by
    construction) and the secondary indexes built once after the rows are in (PostgreSQL
    sorts once instead of inserting 50 million keys one by one).  Returns seconds."""
    step = len(ids) // per_user
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("SET maintenance_work_mem = '512MB'")
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'memberships'"
            " AND indexname <> 'memberships_pkey'"
        )
        for index in indexes:
            await conn.execute(f'DROP INDEX "{index["indexname"]}"')
        for lo in range(first, last + 1, LOAD_CHUNK):
            hi = min(last, lo + LOAD_CHUNK - 1)
            await conn.copy_records_to_table(
                "memberships",
                records=(
                    (u, ids[(u + k * step) % len(ids)])
                    for u in range(lo, hi + 1)
                    for k in range(per_user)
                ),
                columns=["user_id", "segment_id"],
            )
            await conn.copy_records_to_table(
                "user_versions",
                records=((u, u) for u in range(lo, hi + 1)),
                columns=["user_id", "version"],
            )
            if last - first >= LOAD_CHUNK:
                print(f"    loaded users up to {hi:,} ({time.perf_counter() - started:.0f}s)")
        for index in indexes:
            await conn.execute(index["indexdef"])
        # As a long-running database would be: hint bits set, statistics fresh.
        await conn.execute("VACUUM ANALYZE memberships")
        await conn.execute("VACUUM ANALYZE user_versions")
    finally:
        await conn.close()
    return time.perf_counter() - started


# -- rebuild and memory -------------------------------------------------------------------


def pids_of(pid: int | None) -> list[int]:
    return [] if pid is None else [pid, *descendants(pid)]


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
        procs = {name: pids_of(pid) for name, pid in pids.items()}
        cpu0 = {name: cpu_seconds(p) for name, p in procs.items()}
        self0 = cpu_now()
        started = time.perf_counter()
        done = await container.segments.rebuild_cache()
        seconds = time.perf_counter() - started
        self1 = cpu_now()
        if done:
            break
        print(f"    rebuild attempt {attempt + 1} gave up after {seconds:.1f}s", flush=True)
        await asyncio.sleep(3)  # the service's connections reconnect
    else:
        raise RuntimeError("the cache rebuild did not complete in 3 attempts (see the log)")
    cpu = {
        name: sum(
            v - cpu0[name].get(pid, 0.0) for pid, v in cpu_seconds(pids_of(pids[name])).items()
        )
        for name in procs
    }
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
    return await build(load_settings({**env, "SEGMENTS_REDIS_URL": redis_url}))


# -- PostgreSQL size ----------------------------------------------------------------------


async def pg_sizes(url: str) -> dict[str, int]:
    """Bytes on disk: the database, and each table (heap) and index of the user data."""
    conn = await asyncpg.connect(url)
    try:
        sizes = {"database": await conn.fetchval("SELECT pg_database_size(current_database())")}
        for table in ("memberships", "user_versions"):
            sizes[f"{table} (heap)"] = await conn.fetchval("SELECT pg_relation_size($1)", table)
            for row in await conn.fetch(
                "SELECT indexname, pg_relation_size(indexname::regclass) AS size"
                " FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
                table,
            ):
                sizes[f"  {row['indexname']}"] = row["size"]
        return sizes
    finally:
        await conn.close()


async def history_partition_size(url: str, start: dt.datetime) -> tuple[str, int, int]:
    """(partition, heap bytes, index bytes) of membership_history for ``start``'s month."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT c.relname, pg_relation_size(c.oid) AS heap,"
            " pg_indexes_size(c.oid) AS idx"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'membership_history'::regclass"
            " ORDER BY pg_relation_size(c.oid) DESC LIMIT 1"
        )
        assert row is not None
        return row["relname"], row["heap"], row["idx"]
    finally:
        await conn.close()


# -- the API ------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(
    env: dict[str, str], port: int, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """``segments serve`` (one worker); yields it with the seconds from its start to
    ``/readyz`` answering 200 with status ``ready``.  Terminated on exit."""
    args = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "1"]
    with log.open("wb") as err:
        started = time.perf_counter()
        # Our own interpreter and module with fixed arguments, no shell.
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)  # nosec B603
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(  # nosec B310: loopback, our own server
                        f"http://127.0.0.1:{port}/readyz", timeout=1
                    ) as r:
                        if r.status == 200 and orjson.loads(r.read())["status"] == "ready":
                            break
                except (OSError, urllib.error.HTTPError):
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"segments serve exited; log: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("segments serve did not become ready in 120 s")
                time.sleep(0.01)
            yield proc, time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(15)


@dataclass(frozen=True)
class Reads:
    result: OpenLoopResult
    cpu_us: float  # the API process's CPU per request sent, microseconds
    load: float  # the machine's 1-minute load average at the end (other processes)


def read_round(port: int, pid: int, users: int, rate: float, seconds: float) -> Reads:
    """An open-loop round; the API's CPU per request too, which other work on a shared
    machine does not inflate as it does the tail latency."""
    before = cpu_seconds([pid])
    result = run_open_loop(
        "127.0.0.1",
        port,
        ZipfUsers(users),
        rate=rate,
        seconds=seconds,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    cpu = cpu_delta(before, cpu_seconds([pid]))
    return Reads(result, cpu / max(result.sent, 1) * 1e6, os.getloadavg()[0])


# -- the whole run ------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    figure: str
    target: str = ""
    ok: bool | None = None


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


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
                    pids_now = {name: pids_of(pid) for name, pid in pids.items()}
                    cpu0 = {name: cpu_seconds(p) for name, p in pids_now.items()}
                    self0 = cpu_now()
                    started = time.perf_counter()
                    scanned = await container.reconciler.scan()
                    scan_s = time.perf_counter() - started
                    self_cpu = cpu_now() - self0
                    used = {
                        name: sum(
                            v - cpu0[name].get(pid, 0.0)
                            for pid, v in cpu_seconds(pids_of(pids[name])).items()
                        )
                        for name in pids
                    }
                    phase.mark(
                        f"scan: {scanned} in {scan_s:.1f}s, CPU {used}, self {self_cpu:.1f}s"
                    )
                    rows.append(
                        Row(
                            f"full version scan, {scanned.users:,} users",
                            f"{scan_s:.1f} s ({scanned.users / scan_s:,.0f} users/s,"
                            f" {scanned.found} behind); Valkey {used['valkey']:.1f} s CPU"
                            f" ({used['valkey'] / scan_s:.2f} cores,"
                            f" {used['valkey'] / scanned.users * 1e6:.2f} us/user),"
                            f" PostgreSQL {used['postgres']:.1f} s, reconciler {self_cpu:.1f} s",
                        )
                    )
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


def measure_reads(
    a: argparse.Namespace,
    env: dict[str, str],
    small_url: str,
    big_url: str,
    tmp: str,
    baseline: int,
    phase: Phase,
) -> list[Row]:
    rows: list[Row] = []
    big_port, small_port = free_port(), free_port()
    big_env = {**env, "SEGMENTS_REDIS_URL": big_url}
    small_env = {**env, "SEGMENTS_REDIS_URL": small_url}
    with (
        serve(big_env, big_port, Path(tmp) / "api-big.log") as (big_proc, ready_s),
        serve(small_env, small_port, Path(tmp) / "api-small.log") as (small_proc, small_ready_s),
    ):
        phase.mark(f"serve start -> ready: {ready_s:.2f}s ({small_ready_s:.2f}s at {baseline:,})")
        rows.append(
            Row(
                "`segments serve` start -> /readyz 200 ready",
                f"{ready_s:.2f} s ({small_ready_s:.2f} s with {baseline:,} users)",
            )
        )
        # Warm both: connections, the Zipf table's first draws, Valkey's pages.
        read_round(big_port, big_proc.pid, a.users, a.rate, 3)
        read_round(small_port, small_proc.pid, baseline, a.rate, 3)
        pairs: list[tuple[OpenLoopResult, OpenLoopResult]] = []
        cpus: list[tuple[float, float]] = []
        for n in range(a.rounds):
            small_r = read_round(small_port, small_proc.pid, baseline, a.rate, a.seconds)
            big_r = read_round(big_port, big_proc.pid, a.users, a.rate, a.seconds)
            pairs.append((small_r.result, big_r.result))
            cpus.append((small_r.cpu_us, big_r.cpu_us))
            for users, r in ((baseline, small_r), (a.users, big_r)):
                phase.mark(
                    f"reads round {n + 1}, {users:,} users: {r.result.summary()};"
                    f" API {r.cpu_us:.0f} us CPU/request; load average {r.load:.1f}"
                )
        assert big_proc.poll() is None
    ratio = statistics.median(b.p99_ms / s.p99_ms for s, b in pairs)
    big_p99 = statistics.median(b.p99_ms for _, b in pairs)
    small_p99 = statistics.median(s.p99_ms for s, _ in pairs)
    errors = sum(r.errors for pair in pairs for r in pair)
    behind = any(r.behind for pair in pairs for r in pair)
    rows.append(
        Row(
            f"read p99 at {a.rate:,.0f}/s open loop, Zipf ids, 1 worker",
            f"{big_p99:.2f} ms at {a.users:,} users vs {small_p99:.2f} ms at {baseline:,}:"
            f" {ratio:.2f}x (median of {a.rounds} alternating rounds of {a.seconds:.0f} s;"
            f" rounds "
            + ", ".join(f"{b.p99_ms:.2f}/{s.p99_ms:.2f}" for s, b in pairs)
            + f"; p50 {statistics.median(b.p50_ms for _, b in pairs):.2f}"
            f"/{statistics.median(s.p50_ms for s, _ in pairs):.2f} ms; errors {errors}"
            + ("; GENERATOR BEHIND" if behind else "")
            + ")",
            "<= 1.10x",
            ratio <= 1.10 and errors == 0 and not behind,
        )
    )
    cpu_ratio = statistics.median(b / s for s, b in cpus)
    rows.append(
        Row(
            "API CPU per read, same rounds",
            f"{statistics.median(b for _, b in cpus):.0f} us at {a.users:,} users vs"
            f" {statistics.median(s for s, _ in cpus):.0f} us at {baseline:,}: {cpu_ratio:.2f}x",
        )
    )
    return rows


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


def print_table(a: argparse.Namespace, rows: list[Row], seconds: float) -> None:
    print(f"\nscale: {a.users:,} users x {a.per_user} memberships over {SEGMENTS} segments,")
    print(f"one embedded stack on {os.cpu_count()} cores; whole run {seconds / 60:.1f} min")
    print("| what | figure | target | |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        mark = "" if row.ok is None else ("✓" if row.ok else "✗")
        print(f"| {row.what} | {row.figure} | {row.target} | {mark} |")


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
