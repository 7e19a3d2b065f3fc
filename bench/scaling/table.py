"""What the scale run prints: phase marks as it goes, then one table of figures."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

from bench.scaling.population import SEGMENTS


@dataclass
class Phase:
    """Wall time of each phase, printed as it goes (the whole must fit in 30 minutes)."""

    started: float = field(default_factory=time.monotonic)

    def mark(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)


@dataclass
class Row:
    what: str
    figure: str
    target: str = ""
    ok: bool | None = None


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def print_table(a: argparse.Namespace, rows: list[Row], seconds: float) -> None:
    print(f"\nscale: {a.users:,} users x {a.per_user} memberships over {SEGMENTS} segments,")
    print(f"one embedded stack on {os.cpu_count()} cores; whole run {seconds / 60:.1f} min")
    print("| what | figure | target | |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        mark = "" if row.ok is None else ("✓" if row.ok else "✗")
        print(f"| {row.what} | {row.figure} | {row.target} | {mark} |")
