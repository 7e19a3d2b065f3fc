"""Configuration: every setting comes from a ``SEGMENTS_*`` environment variable.

The environment is parsed once, at start-up, into a typed, immutable ``Settings``
object; nothing else in the code reads ``os.environ``.  ``docs/operations.md`` lists
the same fields.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from service.domain.rules import MAX_LIST_ITEMS

ENV_PREFIX = "SEGMENTS_"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # Stores.  Empty URLs under `segments dev` mean "start the embedded server".
    database_url: str = ""
    redis_url: str = ""
    kafka_bootstrap: str = ""

    # HTTP.
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # API worker processes sharing the port (SO_REUSEPORT); about one per core.
    http_workers: int = 1
    http_uvloop: bool = True
    max_body_bytes: int = 1024 * 1024
    max_list_length: int = MAX_LIST_ITEMS

    # PostgreSQL pool.  Writes hold a connection for one short transaction.
    db_pool_min: int = 2
    db_pool_max: int = 20
    db_command_timeout_s: float = 5.0
    # Waiting for a free pooled connection: past this, 503 with Retry-After, never a hang.
    db_acquire_timeout_s: float = 2.0

    # Redis.  Timeouts are short on purpose: a slow or paused Redis must make reads
    # fall back to PostgreSQL quickly rather than hang the request.
    redis_timeout_s: float = 0.25
    redis_pool_size: int = 64
    # The hot read goes through one auto-pipelined connection (cache/pipelined.py).
    redis_pipelined_reads: bool = True
    # A Redis Cluster: the URL names any one node; the client discovers the rest.
    redis_cluster: bool = False
    # Reads served from PostgreSQL while the cache is incomplete are bounded, so a
    # cold cache cannot exhaust the database pool.
    fallback_concurrency: int = 16
    # Size of the user batches written to Redis while rebuilding the cache.
    rebuild_batch: int = 10000
    # Pacing of the rebuild (users/s, 0: unpaced).  Unpaced, it takes most of a Valkey
    # core, and the reads Redis still serves queue behind its writes; the users it has
    # passed are read from Redis meanwhile (the progress mark), the rest from PostgreSQL.
    rebuild_max_users_per_s: float = 25_000.0
    # An API process that finds the cache incomplete leaves the rebuild to the
    # reconciler this long before starting one itself.
    rebuild_delay_s: float = 2.0
    # PostgreSQL parallel workers per query of a history report; -1: the server's
    # max_parallel_workers_per_gather.
    report_parallel_workers: int = 0

    # History reports.  Every API process must share the secret: links are signed with
    # it.  Empty: a random per-process secret (fine for one process; `segments dev`
    # generates one and shares it).
    report_secret: str = ""
    report_link_ttl_s: float = 3600.0
    # Pacing of a report's download (CSV rows/s, 0: unpaced): streamed at full speed a
    # month-wide report takes a core of PostgreSQL and of the API from the reads.
    report_max_rows_per_s: float = 200_000.0
    # Base of the report links handed out, e.g. https://segments.example.com; empty: the
    # scheme and host of the request.
    public_base_url: str = ""

    # Reconciler: the round (outbox drain, expiry sweep) runs every sweep_interval_s; a
    # full version scan every scan_interval_s; abandoned promo attempts are undone and
    # CP clean-ups retried every sync_undo_interval_s.
    sweep_interval_s: float = 1.0
    sweep_batch: int = 1000
    scan_interval_s: float = 300.0
    # Pacing of that scan (users/s, 0: unpaced): its Redis pipelines queue reads.
    scan_max_users_per_s: float = 50_000.0
    sync_undo_interval_s: float = 5.0
    # After Redis fails to answer, reads go straight to PostgreSQL for this long
    # before trying Redis again (so a paused Redis does not cost every request a
    # timeout).
    cache_retry_after_s: float = 1.0

    # Merchant audiences.  The internal endpoint takes one JSON body per request,
    # buffered, up to this size (32 MiB holds ~1.4 million ids).
    max_audience_body_bytes: int = 32 * 1024 * 1024
    kafka_topic: str = "merchant-segments"
    kafka_dlq_topic: str = "merchant-segments.dlq"
    kafka_group: str = "segments-ingest"
    kafka_max_batch: int = 500
    # A multi-part snapshot whose parts stop arriving is dropped after this long.
    snapshot_part_ttl_s: float = 600.0
    # Pacing of a replace's copy into PostgreSQL (members/s, 0: unpaced).
    ingest_max_members_per_s: float = 300_000.0

    # Promo sync to CP.
    cp_url: str = ""
    cp_timeout_s: float = 5.0
    cp_max_attempts: int = 4
    # Requests per second toward CP, shared by every sync of one process.
    cp_rate_limit_per_s: float = 50.0
    # The most active synced promos a customer may be counted in.
    sync_threshold: int = 5
    # One deadline for a whole sync call: every CP call and retry fits in it.
    sync_deadline_s: float = 10.0
    # How far ahead a promo's end_date may be.
    sync_horizon_days: int = 366

    # Auth between services: JSON {"caller": {"token": "...", "scopes": [...]}} with
    # scopes among read, write, internal, sync, reports.  Empty: no auth (dev only;
    # `segments dev` generates tokens and prints them).  auth_open_reads lets reads
    # through without a token (for trusted networks).
    auth_tokens: str = ""
    auth_open_reads: bool = False
    # Requests per second per caller (0: no limit); burst defaults to 2 s worth.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: float = 0.0
    # Idle keep-alive connections are closed after this long, so slow or idle
    # clients cannot hold a worker's connections.
    http_keepalive_timeout_s: float = 15.0
    # /readyz answers within about this long whatever the stores do (each check is cut
    # off after it and counts as failed).
    probe_timeout_s: float = 1.0
    # Port of the Prometheus endpoint of the consumer and reconciler processes (the
    # API serves /metrics itself); 0: none.
    metrics_port: int = 0
    # Log lines as JSON (true), text (false), or JSON unless stderr is a terminal.
    log_json: str = "auto"
    # API access log: `all`, `errors` (answers with status >= 400) or `sample:R` (errors
    # and that share of the rest).  Requests slower than access_log_slow_ms are always
    # logged.  Not `all` by default: a line costs ~20 µs of CPU, a large share of a read's.
    access_log: str = "errors"
    access_log_slow_ms: float = 500.0

    # Local data for `segments dev` (embedded servers).
    data_dir: str = "var"

    log_level: str = "INFO"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build ``Settings`` from ``SEGMENTS_*`` variables; raise ``ValueError`` on bad ones."""
    env = os.environ if environ is None else environ
    raw = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in env.items()
        if name.startswith(ENV_PREFIX)
    }
    known = set(Settings.__struct_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        names = ", ".join(ENV_PREFIX + n.upper() for n in unknown)
        raise ValueError(f"unknown setting(s): {names}")
    try:
        # strict=False lets msgspec turn "8080" into 8080 and "0.25" into 0.25.
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid setting: {exc}") from exc


# What each setting does: docs/operations.md's configuration table is generated from
# this (`python -m service.settings`), and a test keeps the two in step.
DOCS: dict[str, str] = {
    "database_url": "PostgreSQL, `postgresql://user:pass@host:port/db` (embedded: `make run`)",
    "redis_url": "Redis/Valkey URL, `redis://host:port/0` (embedded under `make run`)",
    "kafka_bootstrap": "Kafka bootstrap servers, `host:port` (embedded under `make run`)",
    "http_host": "API listen address",
    "http_port": "API listen port",
    "http_workers": "API worker processes sharing the port (SO_REUSEPORT)",
    "http_uvloop": "run the API on uvloop",
    "max_body_bytes": "request body limit (except the internal audience endpoint)",
    "max_list_length": "items per `add` / `remove` list, ids per batch read (at most 1000)",
    "db_pool_min": "asyncpg pool: minimum connections per process",
    "db_pool_max": "asyncpg pool: maximum connections per process",
    "db_command_timeout_s": "per-statement timeout",
    "redis_timeout_s": "Redis connect/read timeout; past it reads fall back to PostgreSQL",
    "redis_pool_size": "redis-py calls in flight per process (batch reads, rebuilds, "
    "scripts); more wait for a free one",
    "redis_pipelined_reads": "hot reads through one auto-pipelined connection",
    "redis_cluster": "`SEGMENTS_REDIS_URL` is a node of a Redis Cluster (reads then go through "
    "redis-py's cluster client, without the pipelined connection)",
    "fallback_concurrency": "PostgreSQL queries at once for reads the cache cannot answer"
    " (reads arriving meanwhile wait and go together, up to 500 a query)",
    "rebuild_batch": "users per batch when rebuilding the cache",
    "rebuild_max_users_per_s": "pace of a cache rebuild, users/s (0: unpaced)",
    "rebuild_delay_s": "an API process finding the cache incomplete leaves the rebuild to the "
    "reconciler this long, then starts it itself",
    "report_parallel_workers": "PostgreSQL parallel workers per query of a history report "
    "(-1: the server's `max_parallel_workers_per_gather`); workers take cores from reads",
    # "report_secret": set below.
    "report_link_ttl_s": "how long a report link works",
    "report_max_rows_per_s": "pace of a report's download, CSV rows/s (0: unpaced)",
    "public_base_url": "base of report links (default: the request's scheme and host)",
    "sweep_interval_s": "reconciler round: outbox drain and expiry sweep",
    "sweep_batch": "users per expiry-sweep transaction",
    "scan_interval_s": "full version scan of Redis against PostgreSQL",
    "scan_max_users_per_s": "pace of the version scan, users/s (0: unpaced)",
    "sync_undo_interval_s": "undo of abandoned promo attempts and CP clean-ups",
    "cache_retry_after_s": "after Redis fails, reads skip it for this long",
    "max_audience_body_bytes": "body limit of the internal audience endpoint",
    "kafka_topic": "topic of merchant audiences",
    "kafka_dlq_topic": "dead-letter topic",
    "kafka_group": "consumer group",
    "kafka_max_batch": "messages per partition batch (one transaction)",
    "snapshot_part_ttl_s": "an incomplete multi-part snapshot is dropped after this long",
    "ingest_max_members_per_s": "pace of copying a replaced audience into PostgreSQL, "
    "members/s (0: unpaced)",
    "cp_url": "base URL of CP (the emulator under `make run`)",
    "cp_timeout_s": "per-call timeout to CP",
    "cp_max_attempts": "attempts per CP call (jittered backoff between)",
    "sync_threshold": "customers with this many active synced segments are skipped",
    "cp_rate_limit_per_s": "requests per second toward CP, per process",
    "sync_deadline_s": "deadline of a whole sync call, CP retries included",
    "sync_horizon_days": "how many days ahead a promo's end_date may be",
    "db_acquire_timeout_s": "wait for a pooled PostgreSQL connection before 503",
    "auth_tokens": "JSON `{caller: {token, scopes}}`; empty disables auth (dev only)",
    "auth_open_reads": "let read routes through without a token",
    "rate_limit_per_s": "requests per second per caller (0: no limit)",
    "rate_limit_burst": "bucket size (default: 2 s worth)",
    "http_keepalive_timeout_s": "idle keep-alive connections are closed after this long",
    "probe_timeout_s": "each check of `/readyz` is cut off after this long (counts as failed)",
    "metrics_port": "Prometheus port of `consume` and `reconcile` (0: none)",
    "log_json": "`true` JSON lines, `false` text, `auto` JSON unless a terminal",
    "access_log": "API access log: `all`, `errors` (status >= 400) or `sample:R` (errors and "
    "that share of the rest, e.g. `sample:0.01`)",
    "access_log_slow_ms": "requests slower than this are always in the access log",
    "data_dir": "where `make run` keeps the embedded servers' data",
    "log_level": "DEBUG, INFO, WARNING, ERROR",
}
# Outside the literal: bandit takes this description for a password by its key (B105), and
# its exemption covers a single statement.  It still warns "no failed test" here: a known
# false alarm (PyCQA/bandit#1204).
DOCS["report_secret"] = "key signing report links; the same on every API process"  # nosec B105


def markdown_table() -> str:
    defaults = Settings()
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name in Settings.__struct_fields__:
        default = getattr(defaults, name)
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {DOCS[name]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
