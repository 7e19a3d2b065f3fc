"""The composition root: settings -> adapters -> the service layer -> entry points.

Only this module knows which adapters implement the domain's ports.  Nothing
connects at import time; ``build`` does, when a process starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from cache.redis_cache import RedisCache
from persistence.audiences import PgAudienceStore
from persistence.promos import PgPromoStore
from persistence.store import PgStore
from persistence.urls import asyncpg_url
from service.cp.client import CpClient
from service.domain.audiences import AudienceService
from service.domain.ports import (
    AudienceStore,
    CacheServer,
    CpConnection,
    Database,
    PromoStore,
    StoreFigures,
)
from service.domain.promos import PromoService
from service.domain.reconcile import Reconciler
from service.domain.reports import HistoryReports
from service.domain.rules import MAX_AUDIENCE_IDS
from service.domain.service import SegmentService
from service.http.app import SYNC_METRICS, Probes, create_app
from service.observability import (
    CP_CALLS,
    CP_SECONDS,
    DB_ACQUIRE_TIMEOUTS,
    DB_POOL_IN_USE,
    DB_POOL_IN_USE_PEAK,
    DB_POOL_SIZE,
    DB_POOL_WAITING,
    PROMO_ERRORS,
    READS,
    SYNCS,
    WRITE_CONFLICTS,
    CounterBridge,
    flush_request_metrics,
)
from service.pg_metrics import PgFigures, rebuild_progress
from service.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

WRITE_CONFLICT_KINDS = ("conflict", "locked", "turn_timeout")


@dataclass
class Container:
    """The services and the adapters under them, each adapter held through its ports
    (``service/domain/ports.py``): a test can build one over in-memory fakes.  Nothing
    here is a concrete adapter; what the entry points need beyond the domain's ports
    (pinging, closing, CP's call counts, PostgreSQL's operational figures) is part of
    the ``Database``, ``CacheServer``, ``CpConnection`` and ``StoreFigures`` ports."""

    settings: Settings
    store: Database
    cache: CacheServer
    segments: SegmentService
    reports: HistoryReports
    audience_store: AudienceStore
    audiences: AudienceService
    promo_store: PromoStore
    promos: PromoService
    cp: CpConnection
    reconciler: Reconciler
    figures: StoreFigures

    async def close(self) -> None:
        await self.cp.close()
        await self.cache.close()
        await self.store.close()


async def build(
    settings: Settings,
    *,
    store: Database | None = None,
    cache: CacheServer | None = None,
    cp: CpConnection | None = None,
    audience_store: AudienceStore | None = None,
    promo_store: PromoStore | None = None,
    figures: StoreFigures | None = None,
) -> Container:
    """Connect the adapters ``settings`` name and build the services over them.  Any
    adapter passed in is used instead of the real one (and closed with the container);
    a ``store`` that is not a ``PgStore`` needs ``audience_store``, ``promo_store`` and
    ``figures`` too, since the real ones are built over PostgreSQL."""
    if store is None:
        if not settings.database_url:
            raise SystemExit("SEGMENTS_DATABASE_URL and SEGMENTS_REDIS_URL must be set")
        store = await PgStore.connect(
            asyncpg_url(settings.database_url),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            command_timeout=settings.db_command_timeout_s,
            acquire_timeout=settings.db_acquire_timeout_s,
        )
        workers = settings.report_parallel_workers
        store.report_parallel_workers = None if workers < 0 else workers
    if cache is None:
        if not settings.redis_url:
            raise SystemExit("SEGMENTS_DATABASE_URL and SEGMENTS_REDIS_URL must be set")
        redis = RedisCache.from_url(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            pool_size=settings.redis_pool_size,
            pipelined_reads=settings.redis_pipelined_reads,
            cluster=settings.redis_cluster,
        )
        await redis.start()
        cache = redis
    if audience_store is None or promo_store is None or figures is None:
        if not isinstance(store, PgStore):
            raise TypeError(
                "a store that is not a PgStore needs audience_store, promo_store and figures"
            )
        if audience_store is None:
            audience_store = PgAudienceStore(
                store, max_members_per_s=settings.ingest_max_members_per_s
            )
        if promo_store is None:
            promo_store = PgPromoStore(store)
        if figures is None:
            figures = PgFigures(store)
    if cp is None:
        cp = CpClient(
            settings.cp_url or "http://127.0.0.1:9/",
            timeout_s=settings.cp_timeout_s,
            max_attempts=settings.cp_max_attempts,
            rate_limit_per_s=settings.cp_rate_limit_per_s,
            on_request=lambda op, outcome, seconds: CP_SECONDS.labels(op, outcome).observe(seconds),
        )
    segments = SegmentService(
        store,
        cache,
        max_items=settings.max_list_length,
        fallback_concurrency=settings.fallback_concurrency,
        rebuild_batch=settings.rebuild_batch,
        rebuild_max_users_per_s=settings.rebuild_max_users_per_s,
        rebuild_delay_s=settings.rebuild_delay_s,
        cache_retry_after_s=settings.cache_retry_after_s,
    )
    secret = settings.report_secret.encode()
    if not secret:
        log.warning(
            "%sREPORT_SECRET is not set: report links work only on this process", ENV_PREFIX
        )
        secret = secrets.token_bytes(32)
    reports = HistoryReports(
        store, secret, settings.report_link_ttl_s, max_rows_per_s=settings.report_max_rows_per_s
    )
    audiences = AudienceService(audience_store, max_ids=MAX_AUDIENCE_IDS)
    promos = PromoService(
        promo_store,
        cache,
        cp,
        threshold=settings.sync_threshold,
        deadline_s=settings.sync_deadline_s,
        horizon_days=settings.sync_horizon_days,
    )
    segments.add_rebuild_phase(promos.rebuild_counters)
    segments.rebuild_progress = rebuild_progress(figures)
    reconciler = Reconciler(
        store, cache, segments, promos, scan_max_users_per_s=settings.scan_max_users_per_s
    )
    # Everything built so far lives as long as the process: frozen, the cyclic
    # collector's full passes no longer rescan it while a rebuild allocates millions.
    gc.collect()
    gc.freeze()
    return Container(
        settings,
        store,
        cache,
        segments,
        reports,
        audience_store,
        audiences,
        promo_store,
        promos,
        cp,
        reconciler,
        figures,
    )


def api_app(container: Container, settings: Settings | None = None) -> web.Application:
    """The HTTP application over a container's services (``settings`` may override the
    container's, e.g. to turn auth on in a test)."""
    return create_app(
        segments=container.segments,
        reports=container.reports,
        audiences=container.audiences,
        promos=container.promos,
        probes=Probes(
            container.segments,
            container.store.ping,
            container.cache.ping,
            container.cache.freshness,
            timeout_s=container.settings.probe_timeout_s,
        ),
        settings=settings or container.settings,
    )


def counter_bridge(container: Container) -> CounterBridge:
    """The domain's and CP client's plain counters, for any process's metrics (the
    reconciler retries syncs and calls CP too)."""
    bridge = CounterBridge()
    segments = container.segments
    bridge.add(
        lambda: {"redis": segments.reads_from_cache, "postgres": segments.reads_from_store},
        lambda name, n: READS.labels(name).inc(n),
    )
    bridge.add(lambda: dict(container.cp.calls), lambda name, n: CP_CALLS.labels(name).inc(n))
    promos = container.promos
    bridge.add(lambda: dict(promos.syncs), lambda name, n: SYNCS.labels(name).inc(n))
    bridge.add(lambda: dict(promos.errors), lambda name, n: PROMO_ERRORS.labels(name).inc(n))
    figures = container.figures
    bridge.add(
        lambda: {"timeouts": figures.pool_counts()["acquire_timeouts"]},
        lambda name, n: DB_ACQUIRE_TIMEOUTS.inc(n),
    )
    bridge.add(
        lambda: {k: v for k, v in figures.pool_counts().items() if k in WRITE_CONFLICT_KINDS},
        lambda name, n: WRITE_CONFLICTS.labels(name).inc(n),
    )

    def pool_gauges() -> None:
        pool = figures.pool_counts()
        DB_POOL_IN_USE.set(pool["in_use"])
        DB_POOL_IN_USE_PEAK.set(pool["in_use_peak"])
        DB_POOL_WAITING.set(pool["waiting"])
        DB_POOL_SIZE.set(pool["max_size"])

    bridge.add_flush(pool_gauges)
    return bridge


async def make_app(settings: Settings) -> web.Application:
    """The API application, with its adapters connected; they close on clean-up."""
    container = await build(settings)
    app = api_app(container)

    bridge = counter_bridge(container)
    bridge.add_flush(flush_request_metrics)
    app[SYNC_METRICS] = bridge.sync  # a scrape then reports all of this worker's counts
    bridge_task = asyncio.create_task(bridge.run())

    async def close(_: web.Application) -> None:
        bridge_task.cancel()  # it syncs once more on the way out
        with contextlib.suppress(asyncio.CancelledError):
            await bridge_task
        await container.close()

    app.on_cleanup.append(close)
    if not await container.segments.cache_complete():
        log.info("cache is not complete: serving reads from PostgreSQL while rebuilding")
        container.segments.start_rebuild()
    return app
