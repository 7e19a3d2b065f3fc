"""Plain numbers kept where they are counted (requests, the domain's and adapters'
counters), moved into prometheus-client every second and at each scrape."""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Histogram

from service.observability.metrics import LATENCY, LATENCY_BUCKETS, REQUESTS

# The upper bounds of LATENCY's buckets as prometheus-client keeps them (+Inf last).
_LATENCY_BOUNDS = (*LATENCY_BUCKETS, math.inf)
_request_metrics: list[RequestMetrics] = []


class RequestMetrics:
    """``REQUESTS`` and ``LATENCY`` of one route and method.

    A request only adds to plain numbers here (``record``); ``flush_request_metrics``
    moves them into prometheus-client at each scrape of ``/metrics`` and every second
    (through the API's ``CounterBridge``, which does the same for the domain's
    counters).  Why: per request, prometheus-client's ``Counter.inc`` and
    ``Histogram.observe`` take locks and several Python calls; ``record`` is three
    additions.
    """

    __slots__ = ("_children", "_pending", "method", "route")

    def __init__(self, method: str, route: str) -> None:
        self.method = method
        self.route = route
        # By status, not yet in prometheus-client: [count, sum, then one count per
        # latency bucket], and the status's (counter, histogram) children.
        self._pending: dict[int, list[float]] = {}
        self._children: dict[int, tuple[Counter, Histogram]] = {}
        _request_metrics.append(self)

    def record(self, status: int, seconds: float) -> None:
        pending = self._pending.get(status)
        if pending is None:
            pending = self._pending[status] = [0.0] * (2 + len(_LATENCY_BOUNDS))
        pending[0] += 1
        pending[1] += seconds
        # The first bucket whose bound is >= seconds, as Histogram.observe picks it.
        pending[2 + bisect_left(_LATENCY_BOUNDS, seconds)] += 1

    def flush(self) -> None:
        for status, pending in self._pending.items():
            if not pending[0]:
                continue
            children = self._children.get(status)
            if children is None:
                children = (
                    REQUESTS.labels(self.method, self.route, str(status)),
                    LATENCY.labels(self.method, self.route, status_class(status)),
                )
                self._children[status] = children
            counter, latency = children
            counter.inc(pending[0])
            # prometheus-client has no public way to add many observations at once:
            # add to the child's sum and bucket values as Histogram.observe does, one
            # update each.  tests/unit/test_request_metrics.py checks that both give
            # the same exposition.
            latency._sum.inc(pending[1])
            for i, n in enumerate(pending[2:]):
                if n:
                    latency._buckets[i].inc(n)
            pending[:] = [0.0] * len(pending)


def status_class(status: int) -> str:
    """``2xx`` for 200..299, and so on."""
    return f"{status // 100}xx"


def flush_request_metrics() -> None:
    """Move every route's recorded requests into prometheus-client."""
    for metrics in _request_metrics:
        metrics.flush()


class CounterBridge:
    """Copies increments of plain counters (read by ``sources``) into Prometheus counters."""

    def __init__(self) -> None:
        self._pairs: list[
            tuple[Callable[[], Mapping[str, float]], Callable[[str, float], None]]
        ] = []
        self._last: dict[tuple[int, str], float] = {}
        self._flushes: list[Callable[[], None]] = []

    def add(
        self, read: Callable[[], Mapping[str, float]], inc: Callable[[str, float], None]
    ) -> None:
        self._pairs.append((read, inc))

    def add_flush(self, flush: Callable[[], None]) -> None:
        """Also call ``flush`` on every sync (for numbers that move themselves)."""
        self._flushes.append(flush)

    def sync(self) -> None:
        for flush in self._flushes:
            flush()
        for index, (read, inc) in enumerate(self._pairs):
            for name, value in read().items():
                delta = value - self._last.get((index, name), 0.0)
                if delta > 0:
                    inc(name, delta)
                self._last[(index, name)] = value

    async def run(self, every_s: float = 1.0) -> None:
        """Sync every second, so that with several workers (one of which answers a
        scrape) no count is more than a second late; and once more when cancelled."""
        try:
            while True:
                self.sync()
                await asyncio.sleep(every_s)
        finally:
            self.sync()
