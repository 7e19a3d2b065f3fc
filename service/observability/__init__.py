"""Metrics (Prometheus) and logs (JSON lines), for every process of the service.

Metrics use prometheus-client.  With several API workers (``serve --workers N``) the
supervisor points every worker at one PROMETHEUS_MULTIPROC_DIR and ``/metrics`` adds
them up.  The domain keeps plain counters and knows nothing of Prometheus: a small
task per process copies their increments here every second.  Each kind of process
(API, consumer, reconciler) exposes only its own families (``FAMILIES``).

The package: ``metrics`` (the families), ``exposition`` (what each process shows,
``metrics_text``), ``bridge`` (request counts and plain counters moved into
prometheus-client) and ``logs``; every name is importable from here.
"""

from service.observability.bridge import (
    CounterBridge,
    RequestMetrics,
    flush_request_metrics,
    status_class,
)
from service.observability.exposition import (
    API,
    CONSUMER,
    FAMILIES,
    RECONCILER,
    metrics_text,
    registry,
    set_cache_gauges,
)
from service.observability.logs import (
    JsonFormatter,
    setup_logging,
)
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
    LATENCY_BUCKETS,
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

__all__ = [
    "API",
    "BUILD_INFO",
    "CACHE_COMPLETE",
    "CONSUMER",
    "CP_CALLS",
    "CP_SECONDS",
    "DB_ACQUIRE_TIMEOUTS",
    "DB_POOL_IN_USE",
    "DB_POOL_IN_USE_PEAK",
    "DB_POOL_SIZE",
    "DB_POOL_WAITING",
    "DIVERGENCE_FOUND",
    "DIVERGENCE_REPAIRED",
    "FAMILIES",
    "KAFKA_APPLIED",
    "KAFKA_DLQ",
    "KAFKA_LAG",
    "LATENCY",
    "LATENCY_BUCKETS",
    "OUTBOX_AGE",
    "OUTBOX_ROWS",
    "PROMO_ERRORS",
    "READS",
    "REBUILD_EXPECTED",
    "REBUILD_WRITTEN",
    "RECONCILER",
    "REQUESTS",
    "SYNCS",
    "SYNC_AGE",
    "SYNC_COUNTS_REPAIRED",
    "WRITE_CONFLICTS",
    "CounterBridge",
    "JsonFormatter",
    "RequestMetrics",
    "flush_request_metrics",
    "metrics_text",
    "registry",
    "set_cache_gauges",
    "setup_logging",
    "status_class",
]
