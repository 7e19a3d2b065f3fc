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

from service.observability.metrics import (
    BUILD_INFO,
    CACHE_COMPLETE,
    CP_CALLS,
    CP_SECONDS,
    DB_ACQUIRE_TIMEOUTS,
    DB_POOL_IN_USE,
    DB_POOL_IN_USE_PEAK,
    DB_POOL_SIZE,
    DB_POOL_WAITING,
    DIVERGENCE_FOUND,
    DIVERGENCE_REPAIRED,
    KAFKA_APPLIED,
    KAFKA_DLQ,
    KAFKA_LAG,
    LATENCY,
    OUTBOX_AGE,
    OUTBOX_ROWS,
    PROMO_ERRORS,
    READS,
    REBUILD_EXPECTED,
    REBUILD_WRITTEN,
    REQUESTS,
    SYNC_AGE,
    SYNC_COUNTS_REPAIRED,
    SYNCS,
    WRITE_CONFLICTS,
)

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
