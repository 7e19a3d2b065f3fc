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
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from bench.stack import server
from bench.write_load.generator import SEGMENTS, TOKEN, generate
from bench.write_load.phases import Phase, run_named_phase
from bench.write_load.probes import hot_users
from bench.write_load.results import report, summary
from devstack import EmbeddedStack, free_port


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
                running.enter_context(contextlib.closing(_Reconciler(env, tmp)))
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
                        phase = run_named_phase(name, a, stack, targets, tmp, round_)
                        results.append(phase)
                        report(phase)
                        hot = hot_users(stack.postgres.url)
                        print(f"  most changed users (history rows): {hot}", flush=True)
                summary(results)
        finally:
            stack.stop()


class _Reconciler:
    """``segments reconcile`` beside the API, as a deployment runs it (log in ``tmp``)."""

    def __init__(self, env: dict[str, str], tmp: str) -> None:
        log = open(os.path.join(tmp, "reconcile.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "service.cli", "reconcile"], env=env, stdout=log, stderr=log
        )

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(15)


if __name__ == "__main__":
    main()
