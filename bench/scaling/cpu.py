"""CPU seconds of the parties to a phase (Valkey, PostgreSQL, with their children)
before and after it."""

from __future__ import annotations

from bench.measure import cpu_delta, cpu_seconds
from devstack import descendants

# Each party's processes: pid -> CPU seconds so far.
Snapshot = dict[str, dict[int, float]]


def pids_of(pid: int | None) -> list[int]:
    return [] if pid is None else [pid, *descendants(pid)]


def cpu_snapshot(pids: dict[str, int]) -> Snapshot:
    """Each party's CPU seconds so far, by process."""
    return {name: cpu_seconds(pids_of(pid)) for name, pid in pids.items()}


def cpu_used(pids: dict[str, int], before: Snapshot) -> dict[str, float]:
    """Each party's CPU seconds since ``before`` (processes started since count whole)."""
    return {name: cpu_delta(before[name], cpu_seconds(pids_of(pid))) for name, pid in pids.items()}
