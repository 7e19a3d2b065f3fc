"""The route table: every route once, with all the router, the OpenAPI document and
auth need to know of it.

``app.create_app`` routes it, ``openapi.build_openapi`` documents it and ``Auth``
enforces its scopes (``route_scopes``), so adding an endpoint is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.http import schemas
from service.http.middleware import Handler
from service.http.serving import HOT_ROUTE

if TYPE_CHECKING:
    from service.http.app import Probes, Site
    from service.http.audience_handlers import AudienceHandlers
    from service.http.handlers import Handlers


@dataclass(frozen=True)
class Views:
    """The objects whose methods answer the routes (built in ``app.create_app``)."""

    segments: Handlers
    audiences: AudienceHandlers
    probes: Probes
    site: Site


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    # The handler, taken from the objects that answer (a getter, so the table is
    # written before they exist).
    handler: Callable[[Views], Handler]
    # The token scope the route needs (SEGMENTS_AUTH_TOKENS); None: open.
    scope: str | None
    # For generated clients; None: served beside the API, not part of its document.
    operation_id: str | None = None
    summary: str = ""
    request: type[Any] | None = None
    response: type[Any] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    tag: str = "segments"
    # Media type of a response that is not JSON.
    media: str | None = None
    description: str | None = None
    # Optional query parameters: (name, parameter object without "name" and "in").
    query: tuple[tuple[str, dict[str, Any]], ...] = ()


_SYNC = (
    "Brings the promo's CP segment in line with the audience and end_date: the first call"
    " creates it, a later call with the same promo_id adds customers who entered the"
    " audience, removes those who left and moves the expiry; unchanged audience and date"
    " answer the same result without calling CP. The threshold T (SEGMENTS_SYNC_THRESHOLD,"
    " default 5) is the most active synced promos a customer may be counted in: a customer"
    " already counted in T (slots held by syncs in flight included) is skipped, so no count"
    " ever exceeds T. 200: in force (CP holds exactly the customers reported, each counted"
    " until end_date). 502/503/504: nothing of this call is in force, now or later (the"
    " attempt is undone; the promo's state becomes failed). 409 sync_in_progress: another"
    " call for this promo is running; retry after Retry-After. 503 outcome_unknown:"
    " PostgreSQL failed while completing; read GET /v1/promos/{promo_id} or retry."
)

_REPORT = (
    "Opens without an Authorization header: the token is the credential (encrypted and"
    " authenticated, it expires after SEGMENTS_REPORT_LINK_TTL_S). One row per change of"
    " what GET /v1/users/{user_id}/segments returned: explicit changes, expiries, segment"
    " deletions and percentage-rule changes, at the time they took effect; for each user"
    " and segment the rows alternate add and remove. A report of one user (any id, seen"
    " or not); a month-wide report lists every user the service has stored anything for."
    " Rows are ordered by time (then user, then segment). 403 invalid_link: altered; 410"
    " link_expired."
)

_EXPLAIN = (
    "For each live segment that includes the user or has an override for them: included"
    " or not, and why: source explicit (a membership, with its expires_at), rule (the"
    " percentage rule: the user's bucket is below auto_percent x 100), explicit+rule,"
    " or excluded (an explicit removal wins over the rule); since: when what a reader"
    " sees last changed, from history. Read from PostgreSQL."
)

# A request body can always be malformed (400), too large (413) or of the wrong type (415).
_BODY = (400, 413, 415, 422)
_AUDIENCE = "/v1/merchants/{merchant_id}/segments/{segment_type}"
_CUSTOMERS = "/internal" + _AUDIENCE + "/customers"
_LANG = {
    "required": False,
    "description": "operation names",
    "schema": {"type": "string", "enum": ["en", "ru"]},
}

# In the order of the API document (the router's order too).
ROUTES = (
    Route("POST", "/v1/segments", lambda v: v.segments.create_segment, "write",
          "createSegment", "Create a segment",
          schemas.SegmentCreate, schemas.SegmentOut, 201, (*_BODY, 409)),
    Route("GET", "/v1/segments", lambda v: v.segments.list_segments, "read",
          "listSegments", "List live segments", None, schemas.SegmentList),
    Route("GET", "/v1/segments/{slug}", lambda v: v.segments.get_segment, "read",
          "getSegment", "Get one segment", None, schemas.SegmentOut, 200, (404,)),
    Route("PATCH", "/v1/segments/{slug}", lambda v: v.segments.update_segment, "write",
          "updateSegment", "Change a segment's percentage rule or description",
          schemas.SegmentUpdate, schemas.SegmentOut, 200, (*_BODY, 404)),
    Route("DELETE", "/v1/segments/{slug}", lambda v: v.segments.delete_segment, "write",
          "deleteSegment", "Delete a segment", None, None, 204, (404,)),
    Route("POST", "/v1/users/segments:batch", lambda v: v.segments.batch_user_segments, "read",
          "getSegmentsOfUsers", "Segments of up to 1,000 users in one call",
          schemas.BatchRead, schemas.BatchSegments, 200, (*_BODY, 503), "users"),
    Route("POST", HOT_ROUTE, lambda v: v.segments.update_user_segments, "write",
          "updateUserSegments", "Add and remove a user's segments atomically",
          schemas.UserSegmentsUpdate, schemas.UserSegments, 200, (*_BODY, 404, 503), "users"),
    Route("GET", HOT_ROUTE, lambda v: v.segments.get_user_segments, "read",
          "getUserSegments", "A user's active segments, sorted",
          None, schemas.UserSegments, 200, (422, 503), "users"),
    Route("GET", HOT_ROUTE + ":explain", lambda v: v.segments.explain_user_segments, "read",
          "explainUserSegments",
          "Why a user is or is not in each segment that includes them or has an override",
          None, schemas.UserExplanation, 200, (422, 503), "users", description=_EXPLAIN),
    Route("PUT", _CUSTOMERS, lambda v: v.audiences.replace, "internal",
          "replaceAudience", "Replace a merchant audience (one JSON body, up to 1,000,000 ids)",
          schemas.CustomersReplace, schemas.AudienceOut, 200, (*_BODY, 503), "audiences"),
    Route("PATCH", _CUSTOMERS, lambda v: v.audiences.patch, "internal",
          "patchAudience", "Add and remove customers of a merchant audience",
          schemas.CustomersPatch, schemas.AudienceOut, 200, (*_BODY, 503), "audiences"),
    Route("GET", _AUDIENCE, lambda v: v.audiences.get, "read",
          "getAudience", "Size, version and last update of a merchant audience",
          None, schemas.AudienceOut, 200, (404, 422), "audiences"),
    # What MPS does: sync, read and cancel promos (the sync scope).
    Route("POST", _AUDIENCE + "/sync", lambda v: v.audiences.sync, "sync",
          "syncPromo", "Sync an audience to CP for a promo (create or update)",
          schemas.SyncRequest, schemas.SyncOut, 200, (*_BODY, 404, 409, 502, 503),
          "promos", description=_SYNC),
    Route("GET", "/v1/promos/{promo_id}", lambda v: v.audiences.promo, "sync",
          "getPromo", "A promo's sync state",
          None, schemas.PromoOut, 200, (404, 422), "promos"),
    Route("DELETE", "/v1/promos/{promo_id}", lambda v: v.audiences.cancel_promo, "sync",
          "cancelPromo",
          "Cancel a promo: its CP segment deleted, its counts released (idempotent)",
          None, None, 204, (404, 409, 422, 503), "promos"),
    Route("GET", "/v1/customers/{customer_id}/sync-count", lambda v: v.audiences.sync_count,
          "read", "getSyncCount", "Active synced segments of a customer",
          None, schemas.SyncCount, 200, (422,), "promos"),
    Route("POST", "/v1/reports/history", lambda v: v.segments.create_report, "reports",
          "createHistoryReport", "Get a link to a month of membership history as CSV",
          schemas.ReportRequest, schemas.ReportLink, 201, _BODY, "reports"),
    # A report link opens on its own: its token is the credential (encrypted,
    # authenticated, expiring).  Asking for one needs the scope.
    Route("GET", "/v1/reports/history/{token}", lambda v: v.segments.download_report, None,
          "downloadHistoryReport",
          "The CSV behind a report link: user_id;segment;operation;timestamp",
          None, None, 200, (403, 410, 422), "reports", "text/csv", description=_REPORT,
          query=(("lang", _LANG),)),
    Route("GET", "/healthz", lambda v: v.probes.healthz, None,
          "getLiveness", "Liveness", None, schemas.Health, 200, (), "operations"),
    Route("GET", "/metrics", lambda v: v.site.metrics, None,
          "getMetrics", "Prometheus metrics (text exposition format)",
          None, None, 200, (), "operations", "text/plain"),
    Route("GET", "/readyz", lambda v: v.probes.readyz, None,
          "getReadiness",
          "Readiness: 200 ready or degraded while reads can be answered, 503 if not",
          None, schemas.Health, 200, (503,), "operations"),
    Route("GET", "/openapi.json", lambda v: v.site.openapi_json, None),
    Route("GET", "/docs", lambda v: v.site.docs, None),
    Route("GET", "/docs/init.js", lambda v: v.site.docs_init, None),
)  # fmt: skip

_SCOPES = {(route.method, route.path): route.scope for route in ROUTES}


def scope_of(method: str, path: str) -> str | None:
    """The scope of the table's route ``method path`` (KeyError if there is none)."""
    return _SCOPES[(method, path)]


def route_defs(views: Views) -> list[web.RouteDef]:
    """The table for ``app.add_routes``; a GET answers HEAD too, as ``web.get`` does."""
    return [
        web.get(r.path, r.handler(views))
        if r.method == "GET"
        else web.route(r.method, r.path, r.handler(views))
        for r in ROUTES
    ]


def route_scopes(router: web.UrlDispatcher) -> Mapping[web.AbstractRoute, str | None]:
    """The scope of each of ``router``'s routes that comes from the table, by route
    object (what aiohttp's match info holds): HEAD takes its GET's."""
    scopes = {}
    for route in router.routes():
        if route.resource is None:
            continue
        method = "GET" if route.method == "HEAD" else route.method
        key = (method, route.resource.canonical)
        if key in _SCOPES:
            scopes[route] = _SCOPES[key]
    return scopes
