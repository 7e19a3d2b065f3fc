"""The reconciler's full version scan at scale (what ``segments reconcile`` runs every
``SEGMENTS_SCAN_INTERVAL_S``): its time and the CPU it costs Valkey and PostgreSQL."""

from __future__ import annotations

import time

from bench.measure import own_cpu_seconds
from bench.scaling.cpu import cpu_snapshot, cpu_used
from bench.scaling.table import Phase, Row
from service.bootstrap import Container


async def measure_scan(container: Container, pids: dict[str, int], phase: Phase) -> Row:
    cpu0 = cpu_snapshot(pids)
    self0 = own_cpu_seconds()
    started = time.perf_counter()
    scanned = await container.reconciler.scan()
    scan_s = time.perf_counter() - started
    self_cpu = own_cpu_seconds() - self0
    used = cpu_used(pids, cpu0)
    phase.mark(f"scan: {scanned} in {scan_s:.1f}s, CPU {used}, self {self_cpu:.1f}s")
    return Row(
        f"full version scan, {scanned.users:,} users",
        f"{scan_s:.1f} s ({scanned.users / scan_s:,.0f} users/s,"
        f" {scanned.found} behind); Valkey {used['valkey']:.1f} s CPU"
        f" ({used['valkey'] / scan_s:.2f} cores,"
        f" {used['valkey'] / scanned.users * 1e6:.2f} us/user),"
        f" PostgreSQL {used['postgres']:.1f} s, reconciler {self_cpu:.1f} s",
    )
