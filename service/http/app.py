"""Builds the aiohttp application from the composition root's objects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import swagger_ui
from aiohttp import web
from aiohttp.typedefs import Middleware

from service.domain.audiences import AudienceService
from service.domain.errors import CacheUnavailable
from service.domain.promos import PromoService
from service.domain.reports import HistoryReports
from service.domain.service import SegmentService
from service.http.audience_handlers import AudienceHandlers
from service.http.handlers import Handlers
from service.http.middleware import (
    Auth,
    RateLimit,
    gates,
    observe,
    observing,
    parse_access_log,
    parse_tokens,
)
from service.http.openapi import build_openapi
from service.http.routes import Views, route_defs, route_scopes, scope_of
from service.http.serving import FRONT_DOOR, HOT_ROUTE, FrontDoor
from service.observability import (
    RequestMetrics,
    flush_request_metrics,
    metrics_text,
    set_cache_gauges,
)
from service.settings import Settings

# What brings this process's plain counters into prometheus-client before a scrape
# (the process's CounterBridge.sync when it has one; else only the request metrics).
SYNC_METRICS: web.AppKey[Callable[[], None]] = web.AppKey("sync_metrics")

SWAGGER_STATIC = Path(swagger_ui.__file__).parent / "static"

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>user-segments API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
"""

DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui'});\n"


class Probes:
    """Liveness and readiness."""

    def __init__(
        self,
        segments: SegmentService,
        store_ping: Callable[[], Awaitable[bool]],
        cache_ping: Callable[[], Awaitable[bool]],
        freshness: Callable[[], Awaitable[dict[str, float]]] | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self._timeout_s = timeout_s
        self._svc = segments
        self._store_ping = store_ping
        self._cache_ping = cache_ping
        self._freshness = freshness

    async def refresh_gauges(self) -> None:
        """Cache state for /metrics, read from the meta hash at scrape time."""
        complete = await self._svc.cache_complete()
        fresh = None
        if self._freshness is not None:
            with contextlib.suppress(CacheUnavailable):
                fresh = await self._freshness()
        set_cache_gauges(complete, fresh, time.time())

    async def _bounded(self, check: Awaitable[bool]) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await check
        except TimeoutError:
            return False

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready = this process answers reads correctly: from a complete Redis copy, or
        from PostgreSQL while the copy is incomplete or Redis is away.  A load balancer
        (a Kubernetes readiness probe) keeps it in rotation then, with ``degraded`` and
        the reasons in the body: taking every pod out because a shared store is away
        would turn answerable reads into connection errors.  PostgreSQL away with a
        complete copy is ``degraded`` too: reads are answered from Redis, writes get
        503 ``storage_unavailable`` with Retry-After.  503 only when neither store can
        answer (PostgreSQL away and the copy incomplete or unreachable)."""
        # Every check is bounded, so the probe answers within its own timeout whatever
        # the stores do; and it only looks: a rebuild is started by reads of an
        # incomplete copy and by the reconciler, never by a probe.
        store_ok, cache_ok = await asyncio.gather(
            self._bounded(self._store_ping()), self._bounded(self._cache_ping())
        )
        complete = cache_ok and bool(await self._bounded(self._svc.cache_complete()))
        reasons = []
        if not store_ok:
            reasons.append("storage_unavailable")  # writes refused; reads need the copy
        if not cache_ok:
            reasons.append("cache_unavailable")  # reads from PostgreSQL
        elif not complete:
            reasons.append("rebuilding")  # reads from PostgreSQL until the copy is whole
        if not reasons:
            status, code = "ready", 200
        elif store_ok or complete:
            status, code = "degraded", 200
        else:
            status, code = "unavailable", 503
        checks: dict[str, object] = {
            "postgres": store_ok,
            "redis": cache_ok,
            "cache_complete": complete,
        }
        if cache_ok and self._freshness is not None:
            # Like LaunchDarkly's synchronized_on: how long ago the reconciler last
            # confirmed that Redis agrees with PostgreSQL (reported, not failed on).
            with contextlib.suppress(CacheUnavailable, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    fresh = await self._freshness()
                if "synchronized_on" in fresh:
                    checks["synchronized_age_s"] = round(time.time() - fresh["synchronized_on"], 1)
                checks["divergence_found"] = int(fresh.get("divergence_found", 0))
                checks["divergence_repaired"] = int(fresh.get("divergence_repaired", 0))
        body = {"status": status, "reasons": reasons, "checks": checks}
        return web.json_response(body, status=code)


class Site:
    """The routes beside the API: metrics, and the API's document and Swagger page."""

    def __init__(self, probes: Probes) -> None:
        self._probes = probes
        self._openapi = orjson.dumps(build_openapi())

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        await self._probes.refresh_gauges()
        request.app.get(SYNC_METRICS, flush_request_metrics)()
        body, content_type = metrics_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=DOCS_PAGE, content_type="text/html")

    async def docs_init(self, request: web.Request) -> web.Response:
        return web.Response(text=DOCS_INIT, content_type="application/javascript")


def create_app(
    *,
    segments: SegmentService,
    reports: HistoryReports,
    audiences: AudienceService,
    promos: PromoService,
    probes: Probes,
    settings: Settings,
) -> web.Application:
    # aiohttp's own limit sits above ours so that our handlers give the JSON 413.
    limit = max(settings.max_body_bytes, settings.max_audience_body_bytes)
    layers: list[Middleware] = []  # after observe, in the app
    callers = parse_tokens(settings.auth_tokens)
    auth = Auth(callers, settings.auth_open_reads) if callers else None
    limiter = None
    if settings.rate_limit_per_s > 0:
        burst = settings.rate_limit_burst or 2 * settings.rate_limit_per_s
        limiter = RateLimit(settings.rate_limit_per_s, burst)
    layers += [m.middleware for m in (auth, limiter) if m is not None]
    access = parse_access_log(settings.access_log, settings.access_log_slow_ms)
    app = web.Application(middlewares=[observe(access), *layers], client_max_size=limit * 2)
    h = Handlers(segments, reports, settings.max_body_bytes, settings.public_base_url)
    hot_metrics = RequestMetrics("GET", HOT_ROUTE)
    # The door's one route: the same checks as the app's layers, made inside observe
    # (its scope looked up once, here).
    scope = scope_of("GET", HOT_ROUTE)
    gate = gates(auth.gate(scope) if auth and scope else None, limiter.check if limiter else None)
    front = observing(lambda _: hot_metrics, access, gate)
    app[FRONT_DOOR] = FrontDoor([front], h.user_segments)
    a = AudienceHandlers(audiences, promos, settings.max_audience_body_bytes)
    app.add_routes(route_defs(Views(h, a, probes, Site(probes))))
    app.router.add_static("/docs/static", SWAGGER_STATIC)
    if auth is not None:
        auth.scopes = route_scopes(app.router)
    return app
