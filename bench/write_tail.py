"""Where the write tail of the Locust mix comes from: hot users, the machine, or the
write path.

    .venv/bin/python -m bench.write_tail [--seconds 60] [--rounds 1]
        [--phases locust64,locust16,open500,pareto40,pareto80] [--baseline DIR]

One stack (embedded PostgreSQL with fsync on, as `make run` has it; Valkey), one
`segments serve` worker with the shipped defaults (tokens configured, open reads, the
default access log, INFO logging) and the reconciler beside it.  Phases, one after the
other on the same stack:

* ``locustN``: ``loadtests/locustfile.py`` headless with N users (the README runs 64);
* ``openR``: an open-loop generator (this module, ``--generate``) sending R writes/s at
  fixed times, latency measured from the intended send time, 50 % of the writes to the
  1 % hottest of ``--write-users`` ids;
* ``paretoR``: the same at R writes/s with the Locust file's id distribution
  (``int(paretovariate(1.2))``: user 1 gets 56 % of all writes);
* ``oneR``: R writes/s, all to user 1;
* ``ceilingR``: R writes/s (as ``openR``) to a bare aiohttp handler doing one single-row
  INSERT on the same PostgreSQL (bench.writes' ceiling): what the machine gives;
* ``NAME@base``: the phase against a second API run from ``--baseline DIR`` (another
  source tree), for an A/B in the same run; ``--rounds`` repeats the list, alternating.

Each phase reports client-side percentiles, the API's own latency histogram for the
write route, CPU (cores) of the API, PostgreSQL, Valkey and the generator, PostgreSQL
backends found waiting on a lock (sampled every 20 ms) and pooled-connection waiters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import cpu_seconds
from bench.stack import server
from devstack import EmbeddedStack, descendants, free_port

TOKEN = "bench-write-tail-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent
WRITE_ROUTE = "/v1/users/{user_id}/segments"
SEGMENTS = [f"LOAD_{i}" for i in range(20)]
# Turns a load generator's (stdout, stderr) into its figures.
Parse = Callable[[str, str], dict[str, object]]


def machine_cpu() -> tuple[float, float]:
    """(CPU seconds busy on all cores, seconds some task waited for a CPU: PSI)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    busy = (sum(fields[:8]) - idle) / tick
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().rsplit("total=", 1)[1]
        waited = int(some) / 1e6
    except (OSError, IndexError, ValueError):
        waited = math.nan
    return busy, waited


def conflicts(port: int) -> dict[str, float]:
    found = scrape(port, ("segments_user_write_conflicts_total",))
    return {k.split('kind="')[1].split('"')[0]: v for k, v in found.items()}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# -- the open-loop generator (a process of its own) ----------------------------------------


def pick_user(rng: random.Random, dist: str, users: int) -> int:
    if dist == "pareto":
        return min(users, int(rng.paretovariate(1.2)))
    if dist == "one":
        return 1
    # "hot": half of the writes to the hottest 1 % of the ids, the rest uniform.
    hot = max(1, users // 100)
    if rng.random() < 0.5:
        return rng.randint(1, hot)
    return rng.randint(1, users)


async def generate(
    port: int, rate: float, seconds: float, dist: str, users: int
) -> dict[str, object]:
    """Send ``rate`` writes/s for ``seconds`` at fixed intended times; latency counts from
    the intended time, so a late send (generator or connection queue) is not hidden."""
    import aiohttp

    rng = random.Random(7)
    url = f"http://127.0.0.1:{port}/v1/users/%d/segments"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: list[float] = []
    others: list[float] = []  # of writes to users other than user 1
    send_lag: list[float] = []
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(intended: float, uid: int, body: bytes) -> None:
            send_lag.append(time.perf_counter() - intended)
            try:
                async with session.post(url % uid, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors[str(resp.status)] += 1
            except Exception as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - intended)
            if uid != 1:
                others.append(latencies[-1])

        tasks = []
        start = time.perf_counter() + 0.2
        total = int(rate * seconds)
        for i in range(total):
            intended = start + i / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            add, remove = rng.sample(SEGMENTS, 2)
            body = json.dumps({"add": [add], "remove": [remove]}).encode()
            tasks.append(asyncio.ensure_future(one(intended, pick_user(rng, dist, users), body)))
        await asyncio.gather(*tasks)
    latencies.sort()
    others.sort()
    send_lag.sort()
    return {
        "sent": total,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "p999_ms": 1000 * percentile(latencies, 0.999),
        "max_ms": 1000 * latencies[-1] if latencies else math.nan,
        "others_p99_ms": 1000 * percentile(others, 0.99),
        "send_lag_p99_ms": 1000 * percentile(send_lag, 0.99),
        "errors": dict(errors),
    }


# -- sampling the stack during a phase ------------------------------------------------------


@dataclass
class Samples:
    n: int = 0
    waits: Counter[str] = field(default_factory=Counter)  # wait_event -> samples x backends
    lock_waiters_max: int = 0
    lock_waiters_sum: int = 0
    active_sum: int = 0
    pool_waiting_max: float = 0.0
    pool_in_use_max: float = 0.0


def sample_stack(dsn: str, api_port: int, stop: threading.Event, out: Samples) -> None:
    """PostgreSQL's active client backends every 20 ms (what they wait on) and the API's
    pool gauges every 250 ms, until ``stop``."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        next_scrape = 0.0
        try:
            while not stop.is_set():
                rows = await conn.fetch(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w"
                    " FROM pg_stat_activity WHERE state = 'active'"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                out.n += 1
                waiting = 0
                for r in rows:
                    out.waits[r["w"]] += 1
                    waiting += r["w"].startswith("Lock:")
                out.active_sum += len(rows)
                out.lock_waiters_sum += waiting
                out.lock_waiters_max = max(out.lock_waiters_max, waiting)
                if time.monotonic() >= next_scrape:
                    next_scrape = time.monotonic() + 0.25
                    gauges = await asyncio.to_thread(scrape, api_port, ("segments_db_pool_",))
                    out.pool_waiting_max = max(
                        out.pool_waiting_max, gauges.get("segments_db_pool_waiting", 0.0)
                    )
                    out.pool_in_use_max = max(
                        out.pool_in_use_max, gauges.get("segments_db_pool_in_use", 0.0)
                    )
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    asyncio.run(run())


def scrape(port: int, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The API's /metrics lines starting with one of ``prefixes`` (name{labels} -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # nosec B310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def write_histogram(port: int) -> dict[float, float]:
    """Cumulative bucket counts of the API's own latency for 2xx writes."""
    out: dict[float, float] = {}
    pattern = re.compile(r'le="([^"]+)"')
    for key, value in scrape(port, ("segments_http_request_seconds_bucket",)).items():
        if 'method="POST"' in key and f'route="{WRITE_ROUTE}"' in key and "2xx" in key:
            le = pattern.search(key)
            if le:
                out[float(le.group(1))] = value
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The bucket bound below which ``q`` of the phase's writes finished (server side)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return "n/a"
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * total:
            return "> 5 s" if math.isinf(bound) else f"<= {1000 * bound:g} ms"
    return "n/a"


# -- running a phase -----------------------------------------------------------------------


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


@contextlib.contextmanager
def sampling(dsn: str, api_port: int) -> Iterator[Samples]:
    out = Samples()
    stop = threading.Event()
    thread = threading.Thread(target=sample_stack, args=(dsn, api_port, stop, out))
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


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
        import csv

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


async def prepare_ceiling(dsn: str) -> None:
    from bench.writes import prepare

    await prepare(dsn)


def create_segments(port: int) -> None:
    for slug in SEGMENTS:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/segments",
            data=json.dumps({"slug": slug}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        urllib.request.urlopen(req, timeout=5).close()  # nosec B310


def hot_users(dsn: str, top: int = 5) -> list[tuple[int, int]]:
    """The users with the most history rows (= the most changes applied)."""
    import asyncpg

    async def run() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT user_id, count(*) FROM membership_history"
                " GROUP BY user_id ORDER BY 2 DESC LIMIT $1",
                top,
            )
        finally:
            await conn.close()
        return [(r[0], r[1]) for r in rows]

    return asyncio.run(run())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--phases", default="locust64,locust16,open500,pareto40,pareto80")
    parser.add_argument("--rounds", type=int, default=1, help="the phase list, this many times")
    parser.add_argument("--write-users", type=int, default=1_000_000)
    parser.add_argument("--fast", action="store_true", help="PostgreSQL without fsync")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the API from this source tree (e.g. `git archive` of an earlier"
        " commit); phases named NAME@base load it",
    )
    parser.add_argument("--generate", nargs=4, metavar=("PORT", "RATE", "DIST", "USERS"))
    a = parser.parse_args()
    if a.generate:
        port, rate, dist, users = a.generate
        import uvloop

        result = uvloop.run(generate(int(port), float(rate), a.seconds, dist, int(users)))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="segments-write-tail-") as tmp:
        stack = EmbeddedStack(Path(tmp), fast=a.fast)
        stack.start()
        try:
            from persistence.migrate import upgrade

            upgrade(stack.postgres.url)
            asyncio.run(prepare_ceiling(stack.postgres.url))
            tokens = {"bench": {"token": TOKEN, "scopes": ["read", "write", "internal"]}}
            env = {
                **os.environ,
                **stack.env(),
                "SEGMENTS_AUTH_TOKENS": json.dumps(tokens),
                "SEGMENTS_AUTH_OPEN_READS": "true",
                "TOKEN": TOKEN,
            }
            os.environ["TOKEN"] = TOKEN  # for the locustfile
            with contextlib.ExitStack() as running:
                targets: dict[str, tuple[int, int]] = {}
                for label, cwd in (("api", None), ("base", a.baseline)):
                    if label == "base" and cwd is None:
                        continue
                    port = free_port()
                    cmd = ["serve", "--port", str(port), "--workers", "1"]
                    # The baseline's modules come first on its path.
                    run = f"import sys, runpy; sys.path.insert(0, {cwd!r}); " if cwd else ""
                    run += "import runpy; runpy.run_module('service.cli', run_name='__main__')"
                    log = os.path.join(tmp, f"{label}.log")
                    proc = running.enter_context(server(["-c", run, *cmd], env, port, log))
                    targets[label] = (proc.pid, port)
                # The ceiling: a bare aiohttp handler doing one single-row INSERT.
                port = free_port()
                cmd = ["-m", "bench.writes", "--ceiling-server", str(port)]
                targets["ceiling"] = (running.enter_context(server(cmd, env, port)).pid, port)
                running.enter_context(contextlib.closing(_reconciler(env, tmp)))
                create_segments(targets["api"][1])
                print(
                    f"write tail: 1 API worker (tokens configured, default access log),"
                    f" reconciler running, PostgreSQL fsync {'off' if a.fast else 'on'},"
                    f" {os.cpu_count()} CPUs, {a.seconds:g} s a phase",
                    flush=True,
                )
                results: list[Phase] = []
                for round_ in range(a.rounds):
                    for name in a.phases.split(","):
                        phase = _phase(name, a, stack, targets, tmp, round_)
                        results.append(phase)
                        report(phase)
                        hot = hot_users(stack.postgres.url)
                        print(f"  most changed users (history rows): {hot}", flush=True)
                summary(results)
        finally:
            stack.stop()


def summary(results: list[Phase]) -> None:
    """Medians over rounds of each phase's client-side write figures."""
    from bench.measure import median

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


class _reconciler:
    def __init__(self, env: dict[str, str], tmp: str) -> None:
        log = open(os.path.join(tmp, "reconcile.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "service.cli", "reconcile"], env=env, stdout=log, stderr=log
        )

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(15)


def _phase(
    name: str,
    a: argparse.Namespace,
    stack: EmbeddedStack,
    targets: dict[str, tuple[int, int]],
    tmp: str,
    round_: int,
) -> Phase:
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


if __name__ == "__main__":
    main()
