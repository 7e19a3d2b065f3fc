"""Running a phase: its load (Locust or the open-loop generator) against one target while
the probes sample, and the figures it leaves."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.measure import cpu_seconds
from bench.write_load.probes import (
    Samples,
    conflicts,
    histogram_quantile,
    machine_cpu,
    sampling,
    write_histogram,
)
from devstack import EmbeddedStack, descendants

ROOT = Path(__file__).resolve().parents[2]
# Turns a load generator's (stdout, stderr) into its figures.
Parse = Callable[[str, str], dict[str, object]]


@dataclass
class Phase:
    name: str
    client: dict[str, object]
    cores: dict[str, float]
    samples: Samples
    server_p50: str
    server_p99: str
    writes: int
    machine_cores: float
    cpu_pressure: float
    conflicts: dict[str, float]


def run_phase(
    name: str,
    command: list[str],
    stack: EmbeddedStack,
    target_pid: int,
    api_port: int,
    seconds: float,
    parse: Parse,
) -> Phase:
    """Run ``command`` (the load on the server ``target_pid``) and measure; the API at
    ``api_port`` gives its metrics (zero deltas when the load is on the ceiling)."""
    groups: dict[str, Callable[[], list[int]]] = {
        "server": lambda: [target_pid],
        "PostgreSQL": lambda: stack.postgres.pids,
        "Valkey": lambda: stack.valkey.pids,
    }
    hist0 = write_histogram(api_port)
    conflicts0 = conflicts(api_port)
    with sampling(stack.postgres.url, api_port) as samples:
        proc = subprocess.Popen(  # nosec B603  (our interpreter or locust, fixed argv)
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ
        )
        time.sleep(1.0)  # past start-up (locust's import, the generator's)
        before = {k: cpu_seconds(f()) for k, f in groups.items()}
        machine0 = machine1 = machine_cpu()
        gen_before = cpu_seconds([proc.pid, *descendants(proc.pid)])
        t0 = t1 = time.monotonic()
        after = before
        # The generator's CPU just before it exits (afterwards /proc has nothing).
        gen_after = gen_before
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - t0 < seconds - 1:
                after = {k: cpu_seconds(f()) for k, f in groups.items()}
                gen_after = cpu_seconds([proc.pid, *descendants(proc.pid)])
                machine1 = machine_cpu()
                t1 = time.monotonic()
        out, err = proc.communicate()
    hist1 = write_histogram(api_port)
    conflicts1 = conflicts(api_port)
    elapsed = t1 - t0
    cores = {
        k: sum(v - before[k].get(pid, 0.0) for pid, v in after[k].items()) / elapsed for k in groups
    }
    cores["generator"] = sum(v - gen_before.get(p, 0.0) for p, v in gen_after.items()) / elapsed
    client = parse(out.decode(), err.decode())
    writes = int(max(hist1.values(), default=0) - max(hist0.values(), default=0))
    return Phase(
        name,
        client,
        cores,
        samples,
        histogram_quantile(hist0, hist1, 0.5),
        histogram_quantile(hist0, hist1, 0.99),
        writes,
        (machine1[0] - machine0[0]) / elapsed,
        (machine1[1] - machine0[1]) / elapsed,
        {k: v - conflicts0.get(k, 0.0) for k, v in conflicts1.items()},
    )


def parse_locust(csv_prefix: str) -> Parse:
    def parse(_out: str, _err: str) -> dict[str, object]:
        rows = {}
        with open(f"{csv_prefix}_stats.csv") as f:
            for row in csv.DictReader(f):
                rows[row["Name"]] = row
        out: dict[str, object] = {}
        for name, label in (
            ("POST /v1/users/[id]/segments", "write"),
            ("/v1/users/[id]/segments", "read"),
            ("Aggregated", "all"),
        ):
            found = rows.get(name)
            if found is None:
                continue
            out[label] = {
                "n": int(found["Request Count"]),
                "fail": int(found["Failure Count"]),
                "rps": float(found["Requests/s"]),
                "p50": found["50%"],
                "p95": found["95%"],
                "p99": found["99%"],
                "p99.9": found["99.9%"],
            }
        return out

    return parse


def parse_generator(out: str, _err: str) -> dict[str, object]:
    return dict(json.loads(out.strip().splitlines()[-1]))


def run_named_phase(
    name: str,
    a: argparse.Namespace,
    stack: EmbeddedStack,
    targets: dict[str, tuple[int, int]],
    tmp: str,
    round_: int,
) -> Phase:
    """The phase ``name`` (see ``bench.write_tail``'s docstring for the names)."""
    seconds = a.seconds
    load, _, which = name.partition("@")
    pid, port = targets[which or "api"]
    metrics_port = port
    if load.startswith("locust"):
        users = int(load.removeprefix("locust"))
        prefix = os.path.join(tmp, f"{name}-{round_}")
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "locust"),
            "-f", "loadtests/locustfile.py", "--headless", "-u", str(users), "-r", "16",
            "-t", f"{int(seconds)}s", "--host", f"http://127.0.0.1:{port}", "--csv", prefix,
            "--only-summary",
        ]  # fmt: skip
        return run_phase(name, cmd, stack, pid, metrics_port, seconds, parse_locust(prefix))
    if load.startswith(("open", "pareto", "ceiling", "one")):
        dist = "pareto" if load.startswith("pareto") else "one" if load[:3] == "one" else "hot"
        rate = load.lstrip("abcdefghijklmnopqrstuvwxyz")
        users = 100_000 if dist == "pareto" else a.write_users
        if load.startswith("ceiling"):
            pid, port = targets["ceiling"]
            metrics_port = targets["api"][1]
        cmd = [
            sys.executable, "-m", "bench.write_tail", "--seconds", str(seconds),
            "--generate", str(port), rate, dist, str(users),
        ]  # fmt: skip
        return run_phase(name, cmd, stack, pid, metrics_port, seconds, parse_generator)
    raise SystemExit(f"unknown phase {name!r}")
