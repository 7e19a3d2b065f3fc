"""What the run prints: a row per state against the targets, then each state's details."""

from __future__ import annotations

import argparse

from bench.read_latency.population import PER_USER
from bench.read_latency.state import StateResult

IDLE_P99_MS = 2.0
P999_MS = 25.0


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
