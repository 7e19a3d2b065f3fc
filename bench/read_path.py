"""Read-path benchmarks: CPU per read against a ceiling measured in the same run.

    .venv/bin/python -m bench.read_path [--users 100000] [--seconds 5] [--rounds 5]

The API runs as it ships (``deploy/kubernetes/``, ``docker-compose.yml``): tokens
configured (``SEGMENTS_AUTH_TOKENS``, three callers), reads need a bearer token, and
every other setting at its default: access log ``errors``, log level ``INFO``, JSON log
lines (written to a file, whose growth is reported).  Every inherited ``SEGMENTS_*``
variable is dropped first.  ``--open-reads`` measures ``make run``'s variant instead
(``SEGMENTS_AUTH_OPEN_READS=true``, tokens still configured).

Measured, in alternating rounds (each: the bare handler, the API with one worker, with
two, and with one worker once 20 percentage segments are defined), for
GET /v1/users/{id}/segments over ``--users`` users x 5 memberships:

1. CPU per request of the API (user + system from /proc, summed over the supervisor
   and its workers) over the bare aiohttp handler's (bench/bare_server.py): the target
   is <= 1.30x.
2. Two workers vs one: CPU per request, <= 1.05x.
3. 20 percentage segments defined vs none: CPU per request, <= 1.03x.

Ratios are medians of the per-round ratios.  Requests/s, p99 and the cores each party
used (API, Valkey, wrk) are reported with them; then batch reads, cache rebuild rate
and Redis memory per user.

Why CPU per request compares fairly: every subject gets the same offered load, from the
same generator with the same settings -- wrk, one thread, 64 connections each keeping
one request outstanding, for the same duration, the same random ids and the same
request bytes (the bare handler gets the Authorization header too, and ignores it) --
and the CPU the server process used is divided by the requests it completed in that
window.  A faster server completes more of them, so its figure is not inflated by idle
time; neither is it deflated by throughput, since CPU time, unlike requests/s, does not
count the time a process waits for a core that wrk or Valkey holds (which is what makes
throughput ratios on this 2-core machine move by 25% between runs).  Under this closed
loop each server is as busy as it can be, so it handles as many requests per event-loop
iteration as its speed allows: that makes the bare handler's figure the lowest it gets,
and the ratio the strictest one (at a lower fixed rate, the per-iteration costs both
servers pay would add the same microseconds to each side and bring the ratio toward 1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from contextlib import ExitStack
from typing import Any

import orjson

from bench.measure import median
from bench.read_cost.population import PER_USER, seed
from bench.read_cost.runs import CONNECTIONS, Bench, Run, Subject, batch_lookups
from bench.read_cost.segments import AUTO_SEGMENTS, auto_segments, call
from bench.read_cost.shipped import api, describe, shipped_env
from bench.stack import bench_stack, server
from devstack import descendants, free_port


def _log_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--open-reads", action="store_true", help="make run's variant: reads need no token"
    )
    a = parser.parse_args()
    names = ("bare", "api1", "api2", "auto")
    runs: dict[str, list[Run]] = {n: [] for n in names}
    with bench_stack() as stack, tempfile.TemporaryDirectory(prefix="segments-read-") as tmp:
        env, token = shipped_env(stack.env(), open_reads=a.open_reads)
        writer = orjson.loads(env["SEGMENTS_AUTH_TOKENS"])["analytics"]["token"]
        seeded = asyncio.run(seed(env, a.users))
        valkey_pid = stack.valkey.pid
        assert valkey_pid is not None
        bench = Bench(a.users, a.seconds, valkey_pid, token)
        ports = {n: free_port() for n in ("bare", "api1", "api2")}
        logs = {n: os.path.join(tmp, f"{n}.log") for n in ("api1", "api2")}
        with ExitStack() as servers:
            procs = {
                "bare": servers.enter_context(
                    server(["-m", "bench.bare_server", str(ports["bare"])], env, ports["bare"])
                ),
                "api1": servers.enter_context(
                    server(api(ports["api1"]), env, ports["api1"], log=logs["api1"])
                ),
                "api2": servers.enter_context(
                    server(api(ports["api2"], 2), env, ports["api2"], log=logs["api2"])
                ),
            }
            read = "/v1/users/1/segments"
            # The configuration is in force: reads are refused without a token (or not).
            expected = 200 if a.open_reads else 401
            assert call(ports["api1"], "GET", read, "") == expected
            assert call(ports["api1"], "GET", read, token) == 200
            subjects = {
                "bare": Subject("bare", ports["bare"], lambda: [procs["bare"].pid]),
                "api1": Subject("api1", ports["api1"], lambda: [procs["api1"].pid]),
                "api2": Subject(
                    "api2",
                    ports["api2"],
                    lambda: [procs["api2"].pid, *descendants(procs["api2"].pid)],
                ),
            }
            lines_before = {n: _log_lines(p) for n, p in logs.items()}
            for _ in range(a.rounds):
                for name in ("bare", "api1", "api2"):
                    runs[name].append(bench.measure(subjects[name]))
                with auto_segments(ports["api1"], writer):
                    runs["auto"].append(bench.measure(subjects["api1"]))
            log_lines = sum(_log_lines(p) - lines_before[n] for n, p in logs.items())
            lookups = batch_lookups(ports["api1"], a.users, 5, bench.headers)
    report(a, describe(env), runs, log_lines, lookups, seeded)


def report(
    a: argparse.Namespace,
    config: str,
    runs: dict[str, list[Run]],
    log_lines: int,
    lookups: float,
    seeded: dict[str, Any],
) -> None:
    def ratio(top: str, bottom: str) -> float:
        pairs = zip(runs[top], runs[bottom], strict=True)
        return median([t.us_per_request / b.us_per_request for t, b in pairs])

    def rounds(name: str) -> str:
        return " ".join(f"{r.us_per_request:.0f}" for r in runs[name])

    def line(label: str, name: str, versus: str = "", target: float = 0.0) -> None:
        rs = runs[name]
        us = median([r.us_per_request for r in rs])
        rps = median([r.wrk.rps for r in rs])
        p99 = median([r.wrk.p99_ms for r in rs])
        cores = [median([r.cores()[i] for r in rs]) for i in range(3)]
        text = f"  {label:<26}{us:6.1f} us/req ({rounds(name)})"
        if versus:
            r = ratio(name, versus)
            verdict = "ok" if r <= target else "MISSED"
            text += f"  = {r:.3f}x {versus} (target <= {target:.2f}x: {verdict})"
        print(text)
        valkey = median([r.valkey_cpu_s / max(r.wrk.requests, 1) * 1e6 for r in rs])
        print(
            f"  {'':<26}{rps:>9,.0f} req/s, p99 {p99:5.2f} ms; cores: API {cores[0]:.2f}, "
            f"Valkey {cores[1]:.2f} ({valkey:.1f} us/req), wrk {cores[2]:.2f}"
        )

    errors = sum(r.wrk.errors for rs in runs.values() for r in rs)
    print(f"\nread path, {a.users:,} users x {PER_USER} memberships, GET /v1/users/{{id}}/segments")
    print(f"configuration: {config}")
    print(
        f"load: wrk, 1 thread, {CONNECTIONS} connections, {a.rounds} alternating rounds of "
        f"{a.seconds} s; CPU of the server's processes (user+system, /proc) per request "
        "completed; figures are medians (per round in brackets), ratios medians of "
        "per-round ratios"
    )
    line("bare aiohttp (ceiling)", "bare")
    line("API, 1 worker", "api1", "bare", 1.30)
    line("API, 2 workers", "api2", "api1", 1.05)
    line(f"API, 1 worker, +{AUTO_SEGMENTS} auto", "auto", "api1", 1.03)

    def rps_ratio(top: str, bottom: str) -> float:
        pairs = zip(runs[top], runs[bottom], strict=True)
        return median([t.wrk.rps / b.wrk.rps for t, b in pairs])

    throughput, workers = rps_ratio("api1", "bare"), rps_ratio("api2", "api1")
    print(
        f"  throughput: API 1 worker = {throughput:.2f}x bare; 2 workers = {workers:.2f}x one "
        f"(on {os.cpu_count()} cores shared with Valkey and wrk)"
    )
    print(f"  API log lines written while measured: {log_lines}")
    print(f"  batch reads (1,000 ids)   {lookups:>9,.0f} user lookups/s")
    print(
        f"  cache rebuild             {seeded['memberships_per_s']:>9,.0f} memberships/s"
        f"  ({seeded['rebuild_s']:.2f} s; median of "
        + ", ".join(f"{rate:,.0f}" for rate in seeded["rebuild_rates"])
        + ")"
    )
    print(f"  Redis memory              {seeded['bytes_per_user']:>9,.0f} bytes/user")
    print(f"  non-2xx responses         {errors}")


if __name__ == "__main__":
    main()
