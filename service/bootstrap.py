"""The composition root: settings -> adapters -> the service layer -> entry points.

Only this module knows which adapters implement the domain's ports.  Nothing
connects at import time; ``build`` does, when a process starts.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from cache.redis_cache import RedisCache
from persistence.store import PgStore
from persistence.urls import asyncpg_url
from service.domain.reports import HistoryReports
from service.domain.service import SegmentService
from service.http.app import Probes, create_app
from service.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Container:
    settings: Settings
    store: PgStore
    cache: RedisCache
    segments: SegmentService
    reports: HistoryReports

    async def close(self) -> None:
        await self.cache.close()
        await self.store.close()


async def build(settings: Settings) -> Container:
    if not settings.database_url or not settings.redis_url:
        raise SystemExit("SEGMENTS_DATABASE_URL and SEGMENTS_REDIS_URL must be set")
    store = await PgStore.connect(
        asyncpg_url(settings.database_url),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        command_timeout=settings.db_command_timeout_s,
    )
    cache = RedisCache.from_url(
        settings.redis_url, timeout_s=settings.redis_timeout_s, pool_size=settings.redis_pool_size
    )
    segments = SegmentService(
        store,
        cache,
        max_items=settings.max_list_length,
        fallback_concurrency=settings.fallback_concurrency,
        rebuild_batch=settings.rebuild_batch,
    )
    secret = settings.report_secret.encode()
    if not secret:
        log.warning(
            "%sREPORT_SECRET is not set: report links work only on this process", ENV_PREFIX
        )
        secret = secrets.token_bytes(32)
    reports = HistoryReports(store, secret, settings.report_link_ttl_s)
    return Container(settings, store, cache, segments, reports)


async def make_app(settings: Settings) -> web.Application:
    """The API application, with its adapters connected; they close on clean-up."""
    container = await build(settings)
    app = create_app(
        container.segments,
        container.reports,
        Probes(container.segments, container.store.ping, container.cache.ping),
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
    )

    async def close(_: web.Application) -> None:
        await container.close()

    app.on_cleanup.append(close)
    if not await container.segments.cache_complete():
        log.info("cache is not complete: serving reads from PostgreSQL while rebuilding")
        container.segments.start_rebuild()
    return app
