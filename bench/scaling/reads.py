"""Reads through the API at scale: ``segments serve`` up to ready, open-loop rounds, and
the p99 at full size against the baseline's, alternating."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.measure import cpu_delta, cpu_seconds
from bench.openloop import OpenLoopResult, ZipfUsers, run_open_loop
from bench.scaling.table import Phase, Row
from devstack import free_port

TOKEN = "scale-bench-read-token-0123456789"  # nosec B105: a throw-away stack's token


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
