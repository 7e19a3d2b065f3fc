"""The generator: raw HTTP/1.1 keep-alive connections, one request in flight on each,
requests sent at their intended times on a loop with microsecond timers (the reasons
are in ``bench.openloop``'s docstring)."""

from __future__ import annotations

import asyncio
import math
import random
import selectors
import time
from collections import deque
from dataclasses import dataclass

from bench.measure import own_cpu_seconds, percentile
from bench.open_loop.result import OpenLoopResult
from bench.open_loop.traffic import PathFor, Request, ZipfUsers


@dataclass(frozen=True)
class OpenLoop:
    """One run: ``rate`` requests/s for ``seconds`` to ``host:port``, each drawn by
    ``path_for``, over ``connections`` connections, ``seed`` seeding the draws."""

    host: str
    port: int
    path_for: PathFor
    rate: float
    seconds: float
    headers: dict[str, str] | None = None
    connections: int = 32
    seed: int = 1


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request in flight."""

    def __init__(self, gen: Generator) -> None:
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


class Generator:
    """The state of one run: requests due, connections idle or busy, what came back."""

    def __init__(self, load: OpenLoop) -> None:
        host, port, rate, seconds = load.host, load.port, load.rate, load.seconds
        self.host, self.port = host, port
        self.path_for, self.rate, self.seconds = load.path_for, rate, seconds
        self.count = int(rate * seconds)
        self.connections = load.connections
        self.rng = random.Random(load.seed)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (load.headers or {}).items())
        self.head = f"Host: {host}:{port}\r\n{extra}"
        self.idle: deque[Connection] = deque()
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
        _, conn = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
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

    def record(self, conn: Connection) -> float:
        assert self.loop is not None
        self.in_flight -= 1
        return self.loop.time() - conn.due

    def answered(self, conn: Connection, status: int) -> None:
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

    def failed(self, conn: Connection, status: int) -> None:
        self.record(conn)
        self.errors += 1
        self.check_done()

    def lost(self, conn: Connection) -> None:
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
        cpu0 = own_cpu_seconds()
        self.start = self.loop.time() + 0.01
        started_at = time.time() + 0.01
        self.loop.call_at(self.start, self.tick)
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), self.seconds + drain_s)
        except TimeoutError:
            self.errors += self.in_flight + (self.count - self.next_index)
        self.stopping = True
        elapsed = self.loop.time() - self.start
        cpu = own_cpu_seconds() - cpu0
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
            p50_ms=percentile(ordered, 0.50) * 1000,
            p99_ms=percentile(ordered, 0.99) * 1000,
            p999_ms=percentile(ordered, 0.999) * 1000,
            max_ms=(ordered[-1] if ordered else math.nan) * 1000,
            send_lag_p99_ms=percentile(lags, 0.99) * 1000,
            send_lag_max_ms=(lags[-1] if lags else math.nan) * 1000,
            generator_cpu=cpu / max(elapsed, 1e-9),
            connections=self.connections,
            started_at=started_at,
            ended_at=time.time(),
            p99_per_second=[
                percentile(sorted(s), 0.99) * 1000 for s in self.per_second[: int(self.seconds)]
            ],
        )


async def open_loop(load: OpenLoop) -> OpenLoopResult:
    """Send ``rate`` requests/s for ``seconds`` and measure each from its intended time.

    Run it on a loop whose timers are finer than a millisecond (``new_loop()``), alone in
    its process (``run_open_loop``), or the generator's own delays count as latency.
    """
    gen = Generator(load)
    if isinstance(load.path_for, ZipfUsers):
        load.path_for(random.Random(0))  # builds the table before the clock starts
    return await gen.run()


def new_loop() -> asyncio.AbstractEventLoop:
    """A selector loop on select(): microsecond timeouts (see ``bench.openloop``'s
    docstring)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())
