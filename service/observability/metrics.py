"""Every metric family of the service (prometheus-client), defined once at import."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

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
# when it starts (every one is written, users with nothing to show too).
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
