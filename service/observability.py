"""Metrics (Prometheus) and logs (JSON lines), for every process of the service.

Metrics use prometheus-client.  With several API workers (``serve --workers N``) the
supervisor points every worker at one PROMETHEUS_MULTIPROC_DIR and ``/metrics`` adds
them up.  The domain keeps plain counters and knows nothing of Prometheus: a small
task per process copies their increments here every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "segments_http_requests_total",
    "HTTP requests by route and status",
    ["method", "route", "status"],
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY = Histogram(
    "segments_http_request_seconds",
    "HTTP request latency by route and status",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
READS = Counter(
    "segments_user_reads_total", "User reads by where they were answered from", ["source"]
)
CP_CALLS = Counter("segments_cp_calls_total", "Calls to CP by outcome", ["outcome"])
CP_SECONDS = Histogram(
    "segments_cp_request_seconds",
    "CP HTTP requests (each attempt) by operation and outcome",
    ["op", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SYNCS = Counter("segments_promo_syncs_total", "Promo syncs by result", ["result"])
PROMO_ERRORS = Counter(
    "segments_promo_errors_total",
    "Promo work that failed and is retried: cleanup (a CP segment not deleted yet),"
    " abandon (undoing an abandoned attempt), mirror (a count not written to Redis)",
    ["kind"],
)
DB_ACQUIRE_TIMEOUTS = Counter(
    "segments_db_pool_acquire_timeouts_total",
    "Requests answered 503 because no pooled PostgreSQL connection came free in time",
)
DB_POOL_IN_USE = Gauge(
    "segments_db_pool_in_use",
    "Pooled PostgreSQL connections in use now",
    multiprocess_mode="livesum",
)
DB_POOL_IN_USE_PEAK = Gauge(
    "segments_db_pool_in_use_peak",
    "Most pooled PostgreSQL connections in use at once since the process started",
    multiprocess_mode="max",
)
DB_POOL_SIZE = Gauge(
    "segments_db_pool_max_size",
    "Size limit of each process's PostgreSQL pool",
    multiprocess_mode="max",
)
KAFKA_APPLIED = Counter("segments_kafka_messages_applied_total", "Kafka messages applied")
KAFKA_DLQ = Counter("segments_kafka_messages_dead_lettered_total", "Messages set aside to the DLQ")
KAFKA_LAG = Gauge(
    "segments_kafka_consumer_lag",
    "Messages not yet applied, per partition",
    ["partition"],
    multiprocess_mode="max",
)
# The cache's gauges describe shared state (Redis's meta hash), which every process
# reads and sets at its own times: with several workers the freshest value is the
# true one ("mostrecent"), where min or max across workers could keep a stale one.
DIVERGENCE_FOUND = Gauge(
    "segments_cache_divergence_found",
    "Users found behind PostgreSQL in Redis, since the copy was built",
    multiprocess_mode="mostrecent",
)
DIVERGENCE_REPAIRED = Gauge(
    "segments_cache_divergence_repaired",
    "Users repaired in Redis by the reconciler, since the copy was built",
    multiprocess_mode="mostrecent",
)
SYNC_AGE = Gauge(
    "segments_cache_synchronized_age_seconds",
    "Seconds since the reconciler last confirmed Redis agrees with PostgreSQL",
    multiprocess_mode="mostrecent",
)
CACHE_COMPLETE = Gauge(
    "segments_cache_complete",
    "1 when Redis holds a complete copy",
    multiprocess_mode="mostrecent",
)


def set_cache_gauges(complete: bool, freshness: Mapping[str, float] | None, now: float) -> None:
    """The cache's gauges from its meta hash (``RedisCache.freshness``; None when it
    could not be read, which leaves those gauges as they were)."""
    CACHE_COMPLETE.set(1 if complete else 0)
    if freshness is None:
        return
    if "synchronized_on" in freshness:
        SYNC_AGE.set(now - freshness["synchronized_on"])
    DIVERGENCE_FOUND.set(freshness.get("divergence_found", 0))
    DIVERGENCE_REPAIRED.set(freshness.get("divergence_repaired", 0))


def metrics_text() -> tuple[bytes, str]:
    """The exposition of this process, or of all workers in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


# The upper bounds of LATENCY's buckets as prometheus-client keeps them (+Inf last).
_LATENCY_BOUNDS = (*LATENCY_BUCKETS, math.inf)
_request_metrics: list[RequestMetrics] = []


class RequestMetrics:
    """``REQUESTS`` and ``LATENCY`` of one route and method.

    A request only adds to plain numbers here (``record``); ``flush_request_metrics``
    moves them into prometheus-client at each scrape of ``/metrics`` and every second
    (through the API's ``CounterBridge``, which does the same for the domain's
    counters).  Why: per request, prometheus-client's ``Counter.inc`` and
    ``Histogram.observe`` (three locked updates, four Python calls) were 60% of the
    request middleware's own time under bench/read_path.py (py-spy); ``record`` is
    three additions.
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
                labels = (self.method, self.route, str(status))
                children = REQUESTS.labels(*labels), LATENCY.labels(*labels)
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


# -- logs ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields given with ``extra={...}`` are kept."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, json_lines: bool | None = None) -> None:
    """JSON lines, or human-readable text when writing to a terminal (as under make run)."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every rebalance step at INFO.
    with contextlib.suppress(Exception):
        logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
