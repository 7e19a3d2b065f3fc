"""What a phase and the whole run print."""

from __future__ import annotations

import json

from bench.measure import median
from bench.write_load.phases import Phase


def report(p: Phase) -> None:
    print(f"\n== {p.name}")
    print(f"  client: {json.dumps(p.client)}")
    print(
        f"  API's own histogram, 2xx writes: {p.writes:,} writes, p50 {p.server_p50},"
        f" p99 {p.server_p99}"
    )
    ours = sum(p.cores.values())
    print(
        "  cores busy: "
        + ", ".join(f"{k} {v:.2f}" for k, v in p.cores.items())
        + f"; whole machine {p.machine_cores:.2f} (others {p.machine_cores - ours:.2f});"
        f" some task waiting for a CPU {100 * p.cpu_pressure:.0f} % of the time"
    )
    print(
        f"  write conflicts: {p.conflicts.get('conflict', 0):.0f} optimistic attempts"
        f" read again, {p.conflicts.get('locked', 0):.0f} changes took the row lock"
    )
    s = p.samples
    n = max(1, s.n)
    waits = ", ".join(f"{w} {c / n:.2f}" for w, c in s.waits.most_common(6))
    print(
        f"  PostgreSQL ({s.n} samples): active backends {s.active_sum / n:.2f} on average,"
        f" waiting on a lock {s.lock_waiters_sum / n:.2f} (at most {s.lock_waiters_max});"
        f" by wait event: {waits}"
    )
    print(
        f"  API pool: at most {s.pool_waiting_max:.0f} callers waiting for a connection,"
        f" at most {s.pool_in_use_max:.0f} in use"
    )


def summary(results: list[Phase]) -> None:
    """Medians over rounds of each phase's client-side write figures."""
    print("\nsummary (medians over rounds; ms):")
    names = list(dict.fromkeys(p.name for p in results))
    for name in names:
        runs = [p for p in results if p.name == name]

        def fig(key: str, runs: list[Phase] = runs) -> str:
            values = []
            for p in runs:
                client = p.client.get("write", p.client)
                assert isinstance(client, dict)
                value = client.get(key)
                if value not in (None, "N/A"):
                    values.append(float(value))
            return f"{median(values):.0f}" if values else "-"

        if name.startswith("locust"):
            figures = f"writes p50 {fig('p50')} p95 {fig('p95')} p99 {fig('p99')}"
        else:
            figures = (
                f"p50 {fig('p50_ms')} p99 {fig('p99_ms')} p99.9 {fig('p999_ms')}"
                f" (users other than 1: p99 {fig('others_p99_ms')})"
            )
        cores = median([p.cores["server"] for p in runs])
        machine = median([p.machine_cores for p in runs])
        print(
            f"  {name:<16} {figures}; server {cores:.2f} cores, machine {machine:.2f};"
            f" rounds {len(runs)}"
        )
