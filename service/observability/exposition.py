"""What each kind of process exposes on ``/metrics``, and the gauges set from the
cache's meta hash."""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from service.observability import metrics

# What each kind of process exposes: its own families only (the API has no Kafka
# consumer, the consumer serves no HTTP), plus the process, platform and GC collectors.
API, CONSUMER, RECONCILER = "api", "consumer", "reconciler"
_EVERY_PROCESS: tuple[MetricWrapperBase, ...] = (
    metrics.BUILD_INFO,
    metrics.DB_POOL_IN_USE,
    metrics.DB_POOL_IN_USE_PEAK,
    metrics.DB_POOL_WAITING,
    metrics.DB_POOL_SIZE,
    metrics.DB_ACQUIRE_TIMEOUTS,
)
# Promo syncs and CP calls happen in the API, and in the reconciler (its undo work).
_PROMOS = (metrics.CP_CALLS, metrics.CP_SECONDS, metrics.SYNCS, metrics.PROMO_ERRORS)
_CACHE = (
    metrics.CACHE_COMPLETE,
    metrics.SYNC_AGE,
    metrics.REBUILD_WRITTEN,
    metrics.REBUILD_EXPECTED,
)
FAMILIES: dict[str, tuple[MetricWrapperBase, ...]] = {
    API: (
        *_EVERY_PROCESS,
        metrics.REQUESTS,
        metrics.LATENCY,
        metrics.READS,
        metrics.WRITE_CONFLICTS,
        *_PROMOS,
        *_CACHE,
    ),
    CONSUMER: (*_EVERY_PROCESS, metrics.KAFKA_APPLIED, metrics.KAFKA_DLQ, metrics.KAFKA_LAG),
    RECONCILER: (
        *_EVERY_PROCESS,
        *_PROMOS,
        *_CACHE,
        metrics.DIVERGENCE_FOUND,
        metrics.DIVERGENCE_REPAIRED,
        metrics.SYNC_COUNTS_REPAIRED,
        metrics.OUTBOX_ROWS,
        metrics.OUTBOX_AGE,
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
    metrics.CACHE_COMPLETE.set(1 if complete else 0)
    if freshness is not None and "synchronized_on" in freshness:
        metrics.SYNC_AGE.set(now - freshness["synchronized_on"])


def metrics_text(process: str = API) -> tuple[bytes, str]:
    """The exposition of this process, or of all workers in multiprocess mode (then
    only the process kind's families: a worker's files hold whatever it created)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        workers = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        shown = CollectorRegistry()
        shown.register(_Only(workers, {m._name for m in FAMILIES[process]}))
        return generate_latest(shown), CONTENT_TYPE_LATEST
    return generate_latest(registry(process)), CONTENT_TYPE_LATEST
