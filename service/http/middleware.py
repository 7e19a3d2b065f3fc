"""Request middleware: errors as JSON, request ids, access logs and metrics (one layer);
bearer-token auth with scopes; per-caller rate limits."""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from random import random
from time import perf_counter

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from service.http.errors import error_for, error_response
from service.observability import RequestMetrics

log = logging.getLogger("segments.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A check made before a route's handler, without awaiting anything: the refusal to
# answer with, or None to go on (``Auth.gate``, ``RateLimit.check``).
Gate = Callable[[web.Request], web.StreamResponse | None]

# Routes anyone may call: probes, metrics and the API description.
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")

CALLER = web.RequestKey("caller", str)


# Request ids: a random per-process prefix and a counter are unique enough and cost
# far less than a uuid4 per request.
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    # Accept a caller's id if it is sane; never echo arbitrary bytes into logs.
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ids):08x}"


# Keyed by (route object, method): a matched route is the same object on every request
# and lives as long as the app, so the table is bounded.  An unmatched request brings a
# new route object each time: those go to one entry per method, and any method outside
# HTTP's usual ones counts as "other" (a client may send any token as a method; each
# would otherwise become a metric label set for good).
_metrics: dict[tuple[object, str], RequestMetrics] = {}
_unmatched: dict[str, RequestMetrics] = {}
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


def _route_metrics(request: web.Request) -> RequestMetrics:
    info = request.match_info
    method = request.method
    metrics = _metrics.get((info.route, method))
    if metrics is not None:
        return metrics
    route = info.route
    if info.http_exception is not None or route.resource is None:
        method = method if method in _KNOWN_METHODS else "other"
        metrics = _unmatched.get(method)
        if metrics is None:
            metrics = _unmatched[method] = RequestMetrics(method, "unmatched")
        return metrics
    metrics = _metrics[(route, method)] = RequestMetrics(method, route.resource.canonical)
    return metrics


@dataclass(frozen=True)
class AccessLog:
    """Which requests get an access-log line (``SEGMENTS_ACCESS_LOG``,
    ``SEGMENTS_ACCESS_LOG_SLOW_MS``): every error answer (status >= 400) and every
    request slower than ``slow_s``, and of the others the share ``sample`` (1: all)."""

    sample: float = 1.0
    slow_s: float = 0.5


LOG_ALL = AccessLog()


def parse_access_log(mode: str, slow_ms: float) -> AccessLog:
    """``all``, ``errors`` or ``sample:R`` (0 < R <= 1); raises ``ValueError``."""
    if not slow_ms > 0:
        raise ValueError("SEGMENTS_ACCESS_LOG_SLOW_MS must be greater than 0")
    if mode == "all":
        return AccessLog(1.0, slow_ms / 1000)
    if mode == "errors":
        return AccessLog(0.0, slow_ms / 1000)
    if mode.startswith("sample:"):
        try:
            share = float(mode.removeprefix("sample:"))
        except ValueError:
            share = math.nan
        if 0 < share <= 1:
            return AccessLog(share, slow_ms / 1000)
    raise ValueError(f"SEGMENTS_ACCESS_LOG must be all, errors or sample:R (0 < R <= 1): {mode!r}")


def observing(
    metrics_of: Callable[[web.Request], RequestMetrics],
    access: AccessLog = LOG_ALL,
    gate: Gate | None = None,
) -> Middleware:
    """The one layer every request goes through: errors as JSON (``errors.error_for``),
    the request id (taken from X-Request-Id or made), an access-log line as ``access``
    says, metrics.

    ``metrics_of`` finds the request's route metrics: from aiohttp's match info in the
    app (``observe``), fixed for the front door's one route (service/http/serving.py).
    ``gate`` (``gates``) checks a request before the handler, inside this layer: the
    front door's one route has one scope, so its auth and rate limit are plain calls
    here rather than middleware layers of their own (each a coroutine, and a scope
    worked out from the path on every request).

    Made cheaper for the read path: one middleware rather than two (observe + errors),
    the route's metrics found once per route, and counted in plain numbers that reach
    prometheus-client at scrape time (``RequestMetrics``).  Measured under wrk (one
    stack, API servers side by side, 8 alternating rounds), API CPU a request over no
    middleware at all: 13.0 us before, 6.7 us after (16,263 -> 18,146 req/s; none:
    20,759).  In-process (``app._handle`` on a mocked GET): 9.3-9.6 us -> 7.3-7.6 us,
    no middleware 4.5 us; merging alone gave 8.5-8.9 us.

    An access-log line costs 21-22 us of CPU in-process (formatting and writing 300
    bytes of JSON; more under load, into a pipe), several times this layer's own cost;
    a 20 s load test wrote 12 MB of them.  Hence ``errors`` by default
    (``SEGMENTS_ACCESS_LOG``): a successful, fast request costs a few comparisons here,
    and is counted in the metrics.
    """
    log_all, share, slow_s = access.sample >= 1, access.sample, access.slow_s

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = _request_id(request)
        started = perf_counter()
        status = 500
        try:
            try:
                refused = None if gate is None else gate(request)
                response = await handler(request) if refused is None else refused
            except Exception as exc:  # error_for answers, or re-raises for aiohttp
                response = error_for(request, exc)
            status = response.status
            response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = request_id
            raise
        finally:
            elapsed = perf_counter() - started
            metrics = metrics_of(request)
            metrics.record(status, elapsed)
            logged = log_all or status >= 400 or elapsed >= slow_s
            if not logged and share:
                # A sample of the rest; random() is fine for that (not for secrets).
                logged = random() < share  # nosec B311
            if logged and log.isEnabledFor(logging.INFO):
                _access_log(request, metrics.route, request_id, status, elapsed)

    return observe


def observe(access: AccessLog) -> Middleware:
    """The app's layer (``observing`` with the route from aiohttp's match info)."""
    return observing(_route_metrics, access)


def _access_log(
    request: web.Request, route: str, request_id: str, status: int, elapsed: float
) -> None:
    # Ids in paths are the only personal data here; bodies are never logged.
    log.info(
        "%s %s %d %.1fms",
        request.method,
        route,
        status,
        elapsed * 1000,
        extra={
            "request_id": request_id,
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "caller": request.get(CALLER, None),
        },
    )


class Caller(msgspec.Struct, frozen=True):
    token: str
    scopes: frozenset[str]


SCOPES = frozenset({"read", "write", "internal", "sync", "reports"})


def parse_tokens(raw: str) -> dict[str, Caller]:
    """``SEGMENTS_AUTH_TOKENS``: JSON ``{"caller": {"token": "...", "scopes": [...]}}``."""
    if not raw:
        return {}
    callers = msgspec.json.decode(raw, type=dict[str, Caller])
    for name, caller in callers.items():
        unknown = caller.scopes - SCOPES
        if unknown or len(caller.token) < 16:
            raise ValueError(
                f"caller {name!r}: scopes must be among {sorted(SCOPES)} and tokens at least "
                "16 characters"
            )
    return callers


def scope_for_unmatched(path: str, method: str) -> str | None:
    """The scope asked of a request that matched no route of the table (routes.py):
    the nearest route's by path, so an unknown path or method answers 401 or 403 to a
    caller who may not use its neighbours, and 404 or 405 only to one who may."""
    if path.startswith(OPEN_PATHS):
        return None
    if path.startswith("/internal/"):
        return "internal"
    if path.startswith("/v1/reports/"):
        if method in ("GET", "HEAD") and path.startswith("/v1/reports/history/"):
            return None
        return "reports"
    if (path.endswith("/sync") and method == "POST") or path.startswith("/v1/promos/"):
        return "sync"
    if method in ("GET", "HEAD") or path == "/v1/users/segments:batch":
        return "read"
    return "write"


def gates(*checks: Gate | None) -> Gate | None:
    """The checks that are there (auth, then rate limit), as one; None for none."""
    present = [check for check in checks if check is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def gate(request: web.Request) -> web.StreamResponse | None:
        for check in present:
            refused = check(request)
            if refused is not None:
                return refused
        return None

    return gate


def _digest(token: str) -> bytes:
    # surrogateescape: a header aiohttp could not decode is still some bytes, never an error.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass
class Auth:
    callers: Mapping[str, Caller]
    open_reads: bool = False
    # The scope of each route, by the route object in aiohttp's match info
    # (routes.route_scopes, set once the app is routed).
    scopes: Mapping[web.AbstractRoute, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Callers by the SHA-256 of their token: a presented token is hashed once and
        # looked up, so the time taken depends on its digest, which tells an attacker
        # nothing about any token's bytes (a compare against each token in turn cost
        # a request time in proportion to the number of callers).
        self._by_digest = {
            _digest(caller.token): (name, caller.scopes) for name, caller in self.callers.items()
        }

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if route in self.scopes:
            scope = self.scopes[route]
        else:
            scope = scope_for_unmatched(request.path, request.method)
        if scope is not None:
            refused = self.check(request, scope)
            if refused is not None:
                return refused
        return await handler(request)

    def gate(self, scope: str) -> Gate | None:
        """The check of a route whose scope is known (None: the route is open)."""
        if scope == "read" and self.open_reads:
            return None
        check = self.check
        return lambda request: check(request, scope)

    def check(self, request: web.Request, scope: str) -> web.Response | None:
        """401 or 403 for a request that may not use a route of ``scope``, else None
        (and the caller's name kept in the request)."""
        if scope == "read" and self.open_reads:
            return None
        header = request.headers.get("Authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        caller = self._identify(token) if token else None
        if caller is None:
            response = error_response(
                "unauthorized", "send a valid token as Authorization: Bearer <token>", status=401
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="user-segments"'
            return response
        name, scopes = caller
        if scope not in scopes:
            return error_response(
                "forbidden",
                f"caller {name!r} lacks the {scope!r} scope for this route",
                {"required_scope": scope},
                status=403,
            )
        request[CALLER] = name
        return None

    def _identify(self, token: str) -> tuple[str, frozenset[str]] | None:
        return self._by_digest.get(_digest(token))


@dataclass
class RateLimit:
    """A token bucket per caller (or per client address when auth is off)."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = self.check(request)
        return await handler(request) if refused is None else refused

    def check(self, request: web.Request) -> web.Response | None:
        """429 for a caller over its rate, else None (and one token taken)."""
        if request.path.startswith(OPEN_PATHS):
            return None
        key = request.get(CALLER) or request.remote or "?"
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        if tokens < 1:
            retry_after = math.ceil((1 - tokens) / self.per_s)
            self._buckets[key] = (tokens, now)
            response = error_response(
                "rate_limited",
                f"more than {self.per_s:g} requests/s; retry after {retry_after} s",
                {"retry_after_s": retry_after},
                status=429,
            )
            response.headers["Retry-After"] = str(retry_after)
            return response
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget idle callers rather than grow forever
            self._buckets.clear()
        return None
