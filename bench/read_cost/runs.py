"""One measured run: wrk against one server, with the CPU the server, Valkey and wrk used;
and batch reads through the API."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.measure import cpu_seconds
from bench.wrk import WrkResult, run_wrk

CONNECTIONS = 64


@dataclass(frozen=True)
class Run:
    """One measured wrk run against one server, with the CPU each party used."""

    wrk: WrkResult
    seconds: float  # wall time of the run
    api_cpu_s: float  # the server's processes
    valkey_cpu_s: float
    wrk_cpu_s: float

    @property
    def us_per_request(self) -> float:
        return self.api_cpu_s / max(self.wrk.requests, 1) * 1e6

    def cores(self) -> tuple[float, float, float]:
        """API, Valkey and wrk, in cores (CPU seconds per second)."""
        s = self.seconds
        return self.api_cpu_s / s, self.valkey_cpu_s / s, self.wrk_cpu_s / s


@dataclass
class Subject:
    name: str
    port: int
    pids: Callable[[], list[int]]  # the server's processes, now


class Bench:
    def __init__(self, users: int, seconds: int, valkey_pid: int, token: str) -> None:
        self.users, self.seconds, self.valkey_pid = users, seconds, valkey_pid
        self.headers = {"Authorization": f"Bearer {token}"}

    def wrk(self, port: int, seconds: int) -> WrkResult:
        url = f"http://127.0.0.1:{port}/v1/users/1/segments"
        return run_wrk(
            url, users=self.users, seconds=seconds, connections=CONNECTIONS, headers=self.headers
        )

    def warm_up(self, subject: Subject) -> None:
        """A short run first; with several workers, until every one of them answers
        (SO_REUSEPORT spreads connections only among the workers already listening)."""
        for _ in range(10):
            pids = subject.pids()
            before = cpu_seconds(pids)
            self.wrk(subject.port, 2)
            after = cpu_seconds(pids)
            busy = [p for p in pids if after.get(p, 0.0) - before.get(p, 0.0) > 0.1]
            if len(busy) >= len(pids) - (len(pids) > 1):  # a supervisor only watches
                return
        raise RuntimeError(f"{subject.name}: not every worker answered")

    def measure(self, subject: Subject) -> Run:
        self.warm_up(subject)
        pids = subject.pids()
        before = cpu_seconds([*pids, self.valkey_pid])
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        result = self.wrk(subject.port, self.seconds)
        elapsed = time.monotonic() - started
        after = cpu_seconds([*pids, self.valkey_pid])
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk = done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime
        api_cpu = sum(after[p] - before.get(p, 0.0) for p in pids if p in after)
        valkey = after.get(self.valkey_pid, 0.0) - before.get(self.valkey_pid, 0.0)
        return Run(result, elapsed, api_cpu, valkey, wrk)


def batch_lookups(port: int, users: int, seconds: float, headers: dict[str, str]) -> float:
    """User lookups/s through POST /v1/users/segments:batch, 1,000 ids per request."""

    async def run() -> float:
        import aiohttp

        done = 0
        stop = time.monotonic() + seconds
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as http:

            async def worker(seed: int) -> None:
                nonlocal done
                start = seed * 1000
                while time.monotonic() < stop:
                    ids = [(start + i) % users + 1 for i in range(1000)]
                    async with http.post("/v1/users/segments:batch", json={"user_ids": ids}) as r:
                        assert r.status == 200
                        await r.read()
                    done += 1000
                    start += 8000

            await asyncio.gather(*(worker(i) for i in range(8)))
        return done / seconds

    return asyncio.run(run())
