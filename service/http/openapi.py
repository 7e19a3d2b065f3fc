"""The OpenAPI 3.1 document, generated from the msgspec Structs that validate requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from service.domain.rules import SLUG_PATTERN, USER_ID_MAX, USER_ID_MIN
from service.http import schemas
from service.http.middleware import scope_for


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
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


# Names for generated clients (Swagger's "Try it out" shows them too).
OPERATION_IDS = {
    ("post", "/v1/segments"): "createSegment",
    ("get", "/v1/segments"): "listSegments",
    ("get", "/v1/segments/{slug}"): "getSegment",
    ("patch", "/v1/segments/{slug}"): "updateSegment",
    ("delete", "/v1/segments/{slug}"): "deleteSegment",
    ("post", "/v1/users/segments:batch"): "getSegmentsOfUsers",
    ("post", "/v1/users/{user_id}/segments"): "updateUserSegments",
    ("get", "/v1/users/{user_id}/segments"): "getUserSegments",
    ("get", "/v1/users/{user_id}/segments:explain"): "explainUserSegments",
    ("put", "/internal/v1/merchants/{merchant_id}/segments/{segment_type}/customers"): (
        "replaceAudience"
    ),
    ("patch", "/internal/v1/merchants/{merchant_id}/segments/{segment_type}/customers"): (
        "patchAudience"
    ),
    ("get", "/v1/merchants/{merchant_id}/segments/{segment_type}"): "getAudience",
    ("post", "/v1/merchants/{merchant_id}/segments/{segment_type}/sync"): "syncPromo",
    ("get", "/v1/promos/{promo_id}"): "getPromo",
    ("delete", "/v1/promos/{promo_id}"): "cancelPromo",
    ("get", "/v1/customers/{customer_id}/sync-count"): "getSyncCount",
    ("post", "/v1/reports/history"): "createHistoryReport",
    ("get", "/v1/reports/history/{token}"): "downloadHistoryReport",
    ("get", "/healthz"): "getLiveness",
    ("get", "/metrics"): "getMetrics",
    ("get", "/readyz"): "getReadiness",
}

# Every operation behind a token can also be refused (401, 403) or throttled (429).
_AUTH_ERRORS = (401, 403, 429)

# A request body can always be malformed (400), too large (413) or of the wrong type (415).
_BODY = (400, 413, 415, 422)
_AUDIENCE = "/v1/merchants/{merchant_id}/segments/{segment_type}"
_CUSTOMERS = "/internal" + _AUDIENCE + "/customers"

# fmt: off
OPERATIONS = [
    Operation("post", "/v1/segments", "Create a segment",
              schemas.SegmentCreate, schemas.SegmentOut, 201, (*_BODY, 409)),
    Operation("get", "/v1/segments", "List live segments", None, schemas.SegmentList),
    Operation("get", "/v1/segments/{slug}", "Get one segment",
              None, schemas.SegmentOut, 200, (404,)),
    Operation("patch", "/v1/segments/{slug}", "Change a segment's percentage rule or description",
              schemas.SegmentUpdate, schemas.SegmentOut, 200, (*_BODY, 404)),
    Operation("delete", "/v1/segments/{slug}", "Delete a segment", None, None, 204, (404,)),
    Operation("post", "/v1/users/segments:batch", "Segments of up to 1,000 users in one call",
              schemas.BatchRead, schemas.BatchSegments, 200, (*_BODY, 503), "users"),
    Operation("post", "/v1/users/{user_id}/segments",
              "Add and remove a user's segments atomically",
              schemas.UserSegmentsUpdate, schemas.UserSegments, 200, (*_BODY, 404, 503), "users"),
    Operation("get", "/v1/users/{user_id}/segments", "A user's active segments, sorted",
              None, schemas.UserSegments, 200, (422, 503), "users"),
    Operation("get", "/v1/users/{user_id}/segments:explain",
              "Why a user is or is not in each segment that includes them or has an override",
              None, schemas.UserExplanation, 200, (422, 503), "users", description=_EXPLAIN),
    Operation("put", _CUSTOMERS, "Replace a merchant audience (one JSON body, up to 1,000,000 ids)",
              schemas.CustomersReplace, schemas.AudienceOut, 200, (*_BODY, 503), "audiences"),
    Operation("patch", _CUSTOMERS, "Add and remove customers of a merchant audience",
              schemas.CustomersPatch, schemas.AudienceOut, 200, (*_BODY, 503), "audiences"),
    Operation("get", _AUDIENCE, "Size, version and last update of a merchant audience",
              None, schemas.AudienceOut, 200, (404, 422), "audiences"),
    Operation("post", _AUDIENCE + "/sync", "Sync an audience to CP for a promo (create or update)",
              schemas.SyncRequest, schemas.SyncOut, 200, (*_BODY, 404, 409, 502, 503),
              "promos", description=_SYNC),
    Operation("get", "/v1/promos/{promo_id}", "A promo's sync state",
              None, schemas.PromoOut, 200, (404, 422), "promos"),
    Operation("delete", "/v1/promos/{promo_id}",
              "Cancel a promo: its CP segment deleted, its counts released (idempotent)",
              None, None, 204, (404, 409, 422, 503), "promos"),
    Operation("get", "/v1/customers/{customer_id}/sync-count",
              "Active synced segments of a customer",
              None, schemas.SyncCount, 200, (422,), "promos"),
    Operation("post", "/v1/reports/history",
              "Get a link to a month of membership history as CSV",
              schemas.ReportRequest, schemas.ReportLink, 201, _BODY, "reports"),
    Operation("get", "/v1/reports/history/{token}",
              "The CSV behind a report link: user_id;segment;operation;timestamp",
              None, None, 200, (403, 410, 422), "reports", "text/csv", description=_REPORT,
              query=(("lang", {"required": False, "description": "operation names",
                               "schema": {"type": "string", "enum": ["en", "ru"]}}),)),
    Operation("get", "/healthz", "Liveness", None, schemas.Health, 200, (), "operations"),
    Operation("get", "/metrics", "Prometheus metrics (text exposition format)",
              None, None, 200, (), "operations", "text/plain"),
    Operation("get", "/readyz",
              "Readiness: 200 ready or degraded while reads can be answered, 503 if not",
              None, schemas.Health, 200, (503,), "operations"),
]
# fmt: on

_ID_SCHEMA: dict[str, object] = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
_PARAMS: dict[str, dict[str, object]] = {
    "merchant_id": {"schema": _ID_SCHEMA},
    "customer_id": {"schema": _ID_SCHEMA},
    "segment_type": {"schema": {"type": "string", "pattern": SLUG_PATTERN}},
    "token": {"schema": {"type": "string"}},
    "slug": {"schema": {"type": "string", "pattern": SLUG_PATTERN}},
    "promo_id": {"schema": {"type": "string", "pattern": SLUG_PATTERN}},
    "user_id": {
        "schema": {
            "type": "integer",
            "minimum": USER_ID_MIN,
            "maximum": USER_ID_MAX,
        }
    },
}


def build_openapi() -> dict[str, Any]:
    types = {op.request for op in OPERATIONS} | {op.response for op in OPERATIONS}
    types.discard(None)
    types.add(schemas.ErrorBody)
    ordered = sorted(types, key=lambda t: t.__name__)  # type: ignore[union-attr]
    refs, components = msgspec.json.schema_components(
        ordered, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(ordered, refs, strict=True))
    error_content = {"application/json": {"schema": ref_of[schemas.ErrorBody]}}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        if op.media is not None:
            responses[str(op.status)] = {
                "description": "OK",
                "content": {op.media: {"schema": {"type": "string"}}},
            }
        elif op.response is None:
            responses[str(op.status)] = {"description": "Done"}
        else:
            responses[str(op.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": ref_of[op.response]}},
            }
        scope = scope_for(op.path, op.method.upper())
        errors = sorted({*op.errors, *(_AUTH_ERRORS if scope else ())})
        for status in errors:
            responses[str(status)] = {"description": "Error", "content": error_content}
        description = op.description or ""
        if scope:
            description = f"Needs a token with the `{scope}` scope. {description}".strip()
        entry: dict[str, Any] = {
            **({"description": description} if description else {}),
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": OPERATION_IDS[(op.method, op.path)],
            # An empty list: open, whatever the document's default says.
            "security": [{"bearer": []}] if scope else [],
            "responses": responses,
        }
        params = [
            {"name": name, "in": "path", "required": True, **spec}
            for name, spec in _PARAMS.items()
            if "{" + name + "}" in op.path
        ]
        params += [{"name": name, "in": "query", **spec} for name, spec in op.query]
        if params:
            entry["parameters"] = params
        if op.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[op.request]}},
            }
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "user-segments",
            "version": "1",
            "description": "Which segments is user X in? Experiments, merchant audiences "
            'and promotion sync. Errors are {"error": {"code", "message", "details"}}.',
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of SEGMENTS_AUTH_TOKENS (`make run` prints dev"
                    " ones); each operation says the scope it needs.",
                }
            },
        },
    }
