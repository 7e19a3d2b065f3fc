"""Metrics (Prometheus) and logs (JSON lines), for every process of the service.

Metrics use prometheus-client.  With several API workers (``serve --workers N``) the
supervisor points every worker at one PROMETHEUS_MULTIPROC_DIR and ``/metrics`` adds
them up.  The domain keeps plain counters and knows nothing of Prometheus: a small
task per process copies their increments here every second.  Each kind of process
(API, consumer, reconciler) exposes only its own families (``FAMILIES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from importlib import metadata

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# No ``*_created`` series: in the text format each is one more series per counter and
# histogram child, of no use to rate() and increase() (they see resets themselves).
disable_created_metrics()  # type: ignore[no-untyped-call]

REQUESTS = Counter(
    "segments_http_requests_total",
    "HTTP requests by route and status",
    ["method", "route", "status"],
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# By status class (2xx, 4xx, 5xx), not the exact status: the counter above has that, and
# a histogram child costs 16 series.
LATENCY = Histogram(
    "segments_http_request_seconds",
    "HTTP request latency by route and status class (2xx, 4xx, 5xx)",
    ["method", "route", "status_class"],
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
WRITE_CONFLICTS = Counter(
    "segments_user_write_conflicts_total",
    "User changes that found the user changed since their read (conflict: read again),"
    " changes that then took the user's row lock (locked), and changes answered 503"
    " because the same user's earlier changes in the process took too long (turn_timeout)",
    ["kind"],
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
DB_POOL_WAITING = Gauge(
    "segments_db_pool_waiting",
    "Callers waiting for a pooled PostgreSQL connection now",
    multiprocess_mode="livesum",
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
# Counted by the reconciler process that scanned (each scan adds what it found): a
# counter per process, which Prometheus adds up across reconcilers and restarts.  The
# totals since the copy was built stay in Redis's meta hash, for /readyz.
DIVERGENCE_FOUND = Counter(
    "segments_cache_divergence_found",
    "Users the version scan found behind PostgreSQL in Redis",
)
DIVERGENCE_REPAIRED = Counter(
    "segments_cache_divergence_repaired",
    "Users the version scan repaired in Redis",
)
SYNC_COUNTS_REPAIRED = Counter(
    "segments_sync_counts_repaired",
    "Customers whose sync count the scan found behind in Redis and repaired",
)
# Set by the reconciler (service/pg_metrics.py).
OUTBOX_ROWS = Gauge(
    "segments_outbox_rows",
    "Rows in an outbox (cache: users' Redis writes, counter: sync counts' Redis writes),"
    " counted up to 1,000,000",
    ["outbox"],
    multiprocess_mode="mostrecent",
)
OUTBOX_AGE = Gauge(
    "segments_outbox_oldest_age_seconds",
    "Age of an outbox's oldest row (0 when empty)",
    ["outbox"],
    multiprocess_mode="mostrecent",
)
# A cache rebuild of this process: users written so far, and how many PostgreSQL knows
# when it starts (an upper bound: users with nothing to show are not written).
REBUILD_WRITTEN = Gauge(
    "segments_cache_rebuild_users_written",
    "Users written to Redis by this process's current (or last) cache rebuild",
    multiprocess_mode="mostrecent",
)
REBUILD_EXPECTED = Gauge(
    "segments_cache_rebuild_users_expected",
    "Users PostgreSQL knows when this process's current (or last) rebuild started"
    " (exact below 1,000,000, PostgreSQL's estimate above)",
    multiprocess_mode="mostrecent",
)
# The cache's gauges describe shared state (Redis's meta hash), which every process
# reads and sets at its own times: with several workers the freshest value is the
# true one ("mostrecent"), where min or max across workers could keep a stale one.
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


def _build_labels() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("user-segments"),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "asyncpg": version("asyncpg"),
        "redis": version("redis"),
    }


_BUILD = _build_labels()
BUILD_INFO = Gauge(
    "segments_build_info",
    "1, labelled with the service's version and those of Python and its main libraries",
    list(_BUILD),
    multiprocess_mode="max",
)
BUILD_INFO.labels(**_BUILD).set(1)

# What each kind of process exposes: its own families only (the API has no Kafka
# consumer, the consumer serves no HTTP), plus the process, platform and GC collectors.
API, CONSUMER, RECONCILER = "api", "consumer", "reconciler"
_EVERY_PROCESS: tuple[MetricWrapperBase, ...] = (
    BUILD_INFO,
    DB_POOL_IN_USE,
    DB_POOL_IN_USE_PEAK,
    DB_POOL_WAITING,
    DB_POOL_SIZE,
    DB_ACQUIRE_TIMEOUTS,
)
# Promo syncs and CP calls happen in the API, and in the reconciler (its undo work).
_PROMOS = (CP_CALLS, CP_SECONDS, SYNCS, PROMO_ERRORS)
_CACHE = (CACHE_COMPLETE, SYNC_AGE, REBUILD_WRITTEN, REBUILD_EXPECTED)
FAMILIES: dict[str, tuple[MetricWrapperBase, ...]] = {
    API: (*_EVERY_PROCESS, REQUESTS, LATENCY, READS, WRITE_CONFLICTS, *_PROMOS, *_CACHE),
    CONSUMER: (*_EVERY_PROCESS, KAFKA_APPLIED, KAFKA_DLQ, KAFKA_LAG),
    RECONCILER: (
        *_EVERY_PROCESS,
        *_PROMOS,
        *_CACHE,
        DIVERGENCE_FOUND,
        DIVERGENCE_REPAIRED,
        SYNC_COUNTS_REPAIRED,
        OUTBOX_ROWS,
        OUTBOX_AGE,
    ),
}
_registries: dict[str, CollectorRegistry] = {}


def registry(process: str) -> CollectorRegistry:
    """The registry a process of this kind exposes (``API``, ``CONSUMER``, ``RECONCILER``).

    Every family is also in prometheus-client's default registry, which nothing serves.
    """
    found = _registries.get(process)
    if found is None:
        found = _registries[process] = CollectorRegistry()
        for collector in (*FAMILIES[process], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            found.register(collector)
    return found


class _Only(Collector):
    """The families of another collector whose names are in ``names``."""

    def __init__(self, collector: Collector, names: set[str]) -> None:
        self._collector = collector
        self._names = names

    def collect(self) -> list[Metric]:
        return [m for m in self._collector.collect() if m.name in self._names]


def set_cache_gauges(complete: bool, freshness: Mapping[str, float] | None, now: float) -> None:
    """The cache's gauges from its meta hash (``RedisCache.freshness``; None when it
    could not be read, which leaves the age as it was)."""
    CACHE_COMPLETE.set(1 if complete else 0)
    if freshness is not None and "synchronized_on" in freshness:
        SYNC_AGE.set(now - freshness["synchronized_on"])


def metrics_text(process: str = API) -> tuple[bytes, str]:
    """The exposition of this process, or of all workers in multiprocess mode (then
    only the process kind's families: a worker's files hold whatever it created)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        workers = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        shown = CollectorRegistry()
        shown.register(_Only(workers, {m._name for m in FAMILIES[process]}))
        return generate_latest(shown), CONTENT_TYPE_LATEST
    return generate_latest(registry(process)), CONTENT_TYPE_LATEST


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
