"""An open-loop HTTP load generator: a fixed request rate, latency from the intended send.

Closed-loop generators (wrk, Locust) wait for a response before the next request, so a
slow server slows the load down and its queueing never shows in the figures.  Here
request *i* is due at ``start + i / rate`` whatever happened before it, and its latency
runs from that intended time (as wrk2 does): time spent waiting for a free connection or
in the server's queue counts.

It speaks raw HTTP/1.1 keep-alive over a few connections (one request in flight on each;
a request due while every connection is busy waits for the first free one, and that wait
is part of its latency).  The event loop is asyncio's selector loop on ``select()``:
its timeouts have microsecond resolution, where epoll's (and uvloop's) are whole
milliseconds, which at 5,000 requests/s would add up to a millisecond of the generator's
own lateness to every latency.

The generator checks itself: ``OpenLoopResult`` gives its CPU share and how late its
timer fired against the schedule (``send_lag_*``); ``behind`` is set when it could not
keep the rate, in which case the figures are the generator's, not the server's.

    result = run_open_loop("127.0.0.1", 8080, ZipfUsers(1_000_000), rate=5000, seconds=20)
    print(result.summary())
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import os
import pickle
import random
import resource
import selectors
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# What ``path_for`` returns: a path to GET, or (method, path, JSON body).
Request = str | tuple[str, str, bytes]
PathFor = Callable[[random.Random], Request]

# Lateness of the generator's own timer beyond which the run does not measure the server.
BEHIND_LAG_P99_S = 0.002


@dataclass(frozen=True)
class OpenLoopResult:
    rate: float  # offered, requests/s
    seconds: float
    sent: int
    ok: int
    errors: int  # non-2xx, connection errors, and requests unanswered at the end
    statuses: dict[int, int]  # non-2xx status -> count
    achieved_rate: float  # sent / the time the sending took
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    send_lag_p99_ms: float  # the generator's timer against the schedule
    send_lag_max_ms: float
    generator_cpu: float  # cores used by the generator process (CPU s / wall s)
    connections: int
    started_at: float  # time.time() of the first intended send
    ended_at: float  # time.time() once every response was in (or given up)
    # p99 latency (ms) of the requests due in each second of the run.
    p99_per_second: list[float] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        """The generator could not keep the schedule itself."""
        return self.achieved_rate < 0.98 * self.rate or self.send_lag_p99_ms > (
            BEHIND_LAG_P99_S * 1000
        )

    def summary(self) -> str:
        text = (
            f"p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms  p99.9 {self.p999_ms:.2f} ms"
            f"  max {self.max_ms:.1f} ms  errors {self.errors}  sent {self.sent:,}"
            f" at {self.achieved_rate:,.0f}/s (offered {self.rate:,.0f}/s)"
            f"  generator {self.generator_cpu:.2f} cores,"
            f" send lag p99 {self.send_lag_p99_ms:.2f} ms"
        )
        if self.statuses:
            text += "  statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        if self.behind:
            text += "  GENERATOR BEHIND: these figures are the generator's, not the server's"
        return text


class ZipfUsers:
    """GET /v1/users/{id}/segments with ids drawn from a Zipf(s) law over ``users``.

    Rank 1 is the hottest user; ranks map to ids by a fixed permutation (a
    multiplicative step coprime with ``users``) so hot users are spread over the id
    space, as real hot users are.  ``hottest(fraction)`` gives the ids of the top ranks.
    Picklable: the table is built lazily in the process that draws.
    """

    def __init__(self, users: int, s: float = 0.99, template: str = "/v1/users/{}/segments"):
        self.users = users
        self.s = s
        self.template = template
        self._cdf: list[float] | None = None
        step = 2_654_435_761 % users or 1
        while math.gcd(step, users) != 1:
            step += 1
        self._step = step

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_cdf": None}

    def user_at(self, rank: int) -> int:
        """The id of the user at ``rank`` (1-based)."""
        return (rank - 1) * self._step % self.users + 1

    def hottest(self, fraction: float) -> list[int]:
        return [self.user_at(r) for r in range(1, max(1, int(self.users * fraction)) + 1)]

    def draw(self, rng: random.Random) -> int:
        if self._cdf is None:
            self._cdf = list(itertools.accumulate(k**-self.s for k in range(1, self.users + 1)))
        rank = bisect.bisect_left(self._cdf, rng.random() * self._cdf[-1]) + 1
        return self.user_at(min(rank, self.users))

    def __call__(self, rng: random.Random) -> Request:
        return self.template.format(self.draw(rng))


class WriteMix:
    """POST /v1/users/{id}/segments adding one of ``slugs`` and removing another:
    ``hot_share`` of them to the ``hot_fraction`` hottest users of ``zipf``, the rest to
    anyone.  Picklable."""

    def __init__(
        self, zipf: ZipfUsers, slugs: list[str], hot_share: float = 0.5, hot_fraction: float = 0.01
    ) -> None:
        self.users = zipf.users
        self.hot = zipf.hottest(hot_fraction)
        self.hot_share = hot_share
        self.slugs = slugs

    def __call__(self, rng: random.Random) -> Request:
        hot = rng.random() < self.hot_share
        uid = rng.choice(self.hot) if hot else rng.randint(1, self.users)
        add, remove = rng.sample(self.slugs, 2)
        body = b'{"add":["%s"],"remove":["%s"]}' % (add.encode(), remove.encode())
        return ("POST", f"/v1/users/{uid}/segments", body)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request in flight."""

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due = 0.0  # intended send time of the request in flight
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, due: float, data: bytes) -> None:
        assert self.transport is not None
        self.due, self.busy = due, True
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            start = head.find(b"content-length:")
            if start < 0:
                self.gen.failed(self, 0)
                self.close()
                return
            stop = head.find(b"\r\n", start)
            length = int(head[start + 15 : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            status = int(head[9:12])
            keep = b"connection: close" not in head
            del self.buf[:total]
            self.busy = False
            self.gen.answered(self, status)
            if not keep:
                self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.busy = False
            self.gen.failed(self, 0)
        self.gen.lost(self)


class _Generator:
    def __init__(
        self,
        host: str,
        port: int,
        path_for: PathFor,
        rate: float,
        seconds: float,
        headers: dict[str, str],
        connections: int,
        seed: int,
    ) -> None:
        self.host, self.port = host, port
        self.path_for, self.rate, self.seconds = path_for, rate, seconds
        self.count = int(rate * seconds)
        self.connections = connections
        self.rng = random.Random(seed)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = f"Host: {host}:{port}\r\n{extra}"
        self.idle: deque[_Conn] = deque()
        self.backlog: deque[tuple[float, bytes]] = deque()
        self.latencies: list[float] = []  # seconds, answered 2xx
        self.per_second: list[list[float]] = [[] for _ in range(math.ceil(seconds) + 1)]
        self.lags: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.sent = 0
        self.in_flight = 0
        self.next_index = 0
        self.start = 0.0
        self.last_sent_at = 0.0
        self.finished: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    def encode(self, request: Request) -> bytes:
        if isinstance(request, str):
            return f"GET {request} HTTP/1.1\r\n{self.head}\r\n".encode()
        method, path, body = request
        return (
            f"{method} {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def connect(self) -> None:
        assert self.loop is not None
        _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.idle.append(conn)
        self.drain_backlog()

    def tick(self) -> None:
        assert self.loop is not None
        now = self.loop.time()
        while self.next_index < self.count:
            due = self.start + self.next_index / self.rate
            if due > now:
                self.loop.call_at(due, self.tick)
                return
            self.lags.append(now - due)
            self.next_index += 1
            self.dispatch(due, self.encode(self.path_for(self.rng)))
        self.last_sent_at = now
        self.check_done()

    def dispatch(self, due: float, data: bytes) -> None:
        self.sent += 1
        self.in_flight += 1
        if self.idle:
            self.idle.popleft().send(due, data)
        else:
            self.backlog.append((due, data))

    def drain_backlog(self) -> None:
        while self.backlog and self.idle:
            due, data = self.backlog.popleft()
            self.idle.popleft().send(due, data)

    def record(self, conn: _Conn) -> float:
        assert self.loop is not None
        self.in_flight -= 1
        return self.loop.time() - conn.due

    def answered(self, conn: _Conn, status: int) -> None:
        latency = self.record(conn)
        if 200 <= status < 300:
            self.latencies.append(latency)
            second = int(conn.due - self.start)
            if 0 <= second < len(self.per_second):
                self.per_second[second].append(latency)
        else:
            self.errors += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
        if conn.transport is not None:
            self.idle.append(conn)
            self.drain_backlog()
        self.check_done()

    def failed(self, conn: _Conn, status: int) -> None:
        self.record(conn)
        self.errors += 1
        self.check_done()

    def lost(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if not self.stopping and self.loop is not None:
            # Replace it; a refused reconnect shows as the backlog's requests timing out.
            task = self.loop.create_task(self.connect())
            task.add_done_callback(lambda t: t.exception())

    def check_done(self) -> None:
        if (
            self.next_index >= self.count
            and self.in_flight == 0
            and self.finished is not None
            and not self.finished.done()
        ):
            self.finished.set_result(None)

    async def run(self, drain_s: float = 10.0) -> OpenLoopResult:
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        for _ in range(self.connections):
            await self.connect()
        cpu0 = _cpu()
        self.start = self.loop.time() + 0.01
        started_at = time.time() + 0.01
        self.loop.call_at(self.start, self.tick)
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), self.seconds + drain_s)
        except TimeoutError:
            self.errors += self.in_flight + (self.count - self.next_index)
        self.stopping = True
        elapsed = self.loop.time() - self.start
        cpu = _cpu() - cpu0
        for conn in list(self.idle):
            conn.close()
        ordered = sorted(self.latencies)
        lags = sorted(self.lags)
        send_time = max(self.last_sent_at - self.start, 1e-9) + 1 / self.rate
        return OpenLoopResult(
            rate=self.rate,
            seconds=self.seconds,
            sent=self.sent,
            ok=len(ordered),
            errors=self.errors,
            statuses=self.statuses,
            achieved_rate=self.sent / send_time,
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            p999_ms=_percentile(ordered, 0.999) * 1000,
            max_ms=(ordered[-1] if ordered else math.nan) * 1000,
            send_lag_p99_ms=_percentile(lags, 0.99) * 1000,
            send_lag_max_ms=(lags[-1] if lags else math.nan) * 1000,
            generator_cpu=cpu / max(elapsed, 1e-9),
            connections=self.connections,
            started_at=started_at,
            ended_at=time.time(),
            p99_per_second=[
                _percentile(sorted(s), 0.99) * 1000 for s in self.per_second[: int(self.seconds)]
            ],
        )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def open_loop(
    host: str,
    port: int,
    path_for: PathFor,
    rate: float,
    seconds: float,
    headers: dict[str, str] | None = None,
    connections: int = 32,
    seed: int = 1,
) -> OpenLoopResult:
    """Send ``rate`` requests/s for ``seconds`` and measure each from its intended time.

    Run it on a loop whose timers are finer than a millisecond (``new_loop()``), alone in
    its process (``run_open_loop``), or the generator's own delays count as latency.
    """
    gen = _Generator(host, port, path_for, rate, seconds, dict(headers or {}), connections, seed)
    if isinstance(path_for, ZipfUsers):
        path_for(random.Random(0))  # builds the table before the clock starts
    return await gen.run()


def new_loop() -> asyncio.AbstractEventLoop:
    """A selector loop on select(): microsecond timeouts (see the module docstring)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def _child_main() -> None:
    """Entry of the generator's process: pickled kwargs on stdin, pickled result out."""
    kwargs = pickle.load(sys.stdin.buffer)  # nosec B301: written by our own parent
    loop = new_loop()
    try:
        out: object = loop.run_until_complete(open_loop(**kwargs))
    except Exception as exc:  # the parent re-raises it
        out = exc
    finally:
        loop.close()
    sys.stdout.buffer.write(pickle.dumps(out))
    sys.stdout.buffer.flush()


class OpenLoopProcess:
    """An open-loop run in a process of its own (no GIL shared with the caller).

    A plain subprocess rather than multiprocessing: a spawned child would re-import the
    caller's ``__main__``, which the benchmarks do not guard for that."""

    def __init__(self, **kwargs: object) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path[1:]])}
        # Our own interpreter and module, no shell.
        self._proc = subprocess.Popen(  # nosec B603
            [sys.executable, "-c", "from bench.openloop import _child_main; _child_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(pickle.dumps(kwargs))
        self._proc.stdin.close()
        self._proc.stdin = None  # communicate() must not flush it again

    @property
    def pid(self) -> int:
        return self._proc.pid

    def result(self, timeout: float | None = None) -> OpenLoopResult:
        try:
            out, _ = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise TimeoutError("the open-loop generator did not finish") from None
        if not out:
            raise RuntimeError(f"the open-loop generator exited {self._proc.returncode}")
        result = pickle.loads(out)  # nosec B301: our own child's output
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, OpenLoopResult)
        return result

    async def wait(self) -> OpenLoopResult:
        return await asyncio.to_thread(self.result)


def start_open_loop(
    host: str,
    port: int,
    path_for: PathFor,
    rate: float,
    seconds: float,
    headers: dict[str, str] | None = None,
    connections: int = 32,
    seed: int = 1,
) -> OpenLoopProcess:
    """Start ``open_loop`` in a new process; ``.result()`` or ``await .wait()`` for it.

    ``path_for`` must be picklable (a module-level function or ``ZipfUsers``)."""
    return OpenLoopProcess(
        host=host,
        port=port,
        path_for=path_for,
        rate=rate,
        seconds=seconds,
        headers=headers,
        connections=connections,
        seed=seed,
    )


def run_open_loop(
    host: str,
    port: int,
    path_for: PathFor,
    rate: float,
    seconds: float,
    headers: dict[str, str] | None = None,
    connections: int = 32,
    seed: int = 1,
) -> OpenLoopResult:
    """``open_loop`` in a process of its own, blocking until it is done."""
    return start_open_loop(host, port, path_for, rate, seconds, headers, connections, seed).result(
        seconds + 60
    )
