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
import os
import sys
import time
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
LATENCY = Histogram(
    "segments_http_request_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
READS = Counter(
    "segments_user_reads_total", "User reads by where they were answered from", ["source"]
)
CP_CALLS = Counter("segments_cp_calls_total", "Calls to CP by outcome", ["outcome"])
SYNCS = Counter("segments_promo_syncs_total", "Promo syncs by result", ["result"])
KAFKA_APPLIED = Counter("segments_kafka_messages_applied_total", "Kafka messages applied")
KAFKA_DLQ = Counter("segments_kafka_messages_dead_lettered_total", "Messages set aside to the DLQ")
KAFKA_LAG = Gauge(
    "segments_kafka_consumer_lag",
    "Messages not yet applied, per partition",
    ["partition"],
    multiprocess_mode="max",
)
DIVERGENCE_FOUND = Gauge(
    "segments_cache_divergence_found",
    "Users found behind PostgreSQL in Redis, since the copy was built",
    multiprocess_mode="max",
)
DIVERGENCE_REPAIRED = Gauge(
    "segments_cache_divergence_repaired",
    "Users repaired in Redis by the reconciler, since the copy was built",
    multiprocess_mode="max",
)
SYNC_AGE = Gauge(
    "segments_cache_synchronized_age_seconds",
    "Seconds since the reconciler last confirmed Redis agrees with PostgreSQL",
    multiprocess_mode="min",
)
CACHE_COMPLETE = Gauge(
    "segments_cache_complete", "1 when Redis holds a complete copy", multiprocess_mode="min"
)


def metrics_text() -> tuple[bytes, str]:
    """The exposition of this process, or of all workers in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class CounterBridge:
    """Copies increments of plain counters (read by ``sources``) into Prometheus counters."""

    def __init__(self) -> None:
        self._pairs: list[
            tuple[Callable[[], Mapping[str, float]], Callable[[str, float], None]]
        ] = []
        self._last: dict[tuple[int, str], float] = {}

    def add(
        self, read: Callable[[], Mapping[str, float]], inc: Callable[[str, float], None]
    ) -> None:
        self._pairs.append((read, inc))

    def sync(self) -> None:
        for index, (read, inc) in enumerate(self._pairs):
            for name, value in read().items():
                delta = value - self._last.get((index, name), 0.0)
                if delta > 0:
                    inc(name, delta)
                self._last[(index, name)] = value

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            self.sync()
            await asyncio.sleep(every_s)


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
