"""The OpenAPI 3.1 document, generated from the route table (routes.py) and the msgspec
Structs that validate requests and encode answers."""

from __future__ import annotations

from typing import Any

import msgspec

from service.domain.rules import SLUG_PATTERN, USER_ID_MAX, USER_ID_MIN
from service.http import schemas
from service.http.routes import ROUTES

# Every operation behind a token can also be refused (401, 403) or throttled (429).
_AUTH_ERRORS = (401, 403, 429)

_ID_SCHEMA: dict[str, object] = {"type": "integer", "minimum": USER_ID_MIN, "maximum": USER_ID_MAX}
_PARAMS: dict[str, dict[str, object]] = {
    "merchant_id": {"schema": _ID_SCHEMA},
    "customer_id": {"schema": _ID_SCHEMA},
    "segment_type": {"schema": {"type": "string", "pattern": SLUG_PATTERN}},
    "token": {"schema": {"type": "string"}},
    "slug": {"schema": {"type": "string", "pattern": SLUG_PATTERN}},
    "promo_id": {"schema": {"type": "string", "pattern": SLUG_PATTERN}},
    "user_id": {"schema": _ID_SCHEMA},
}


def build_openapi() -> dict[str, Any]:
    operations = [route for route in ROUTES if route.operation_id is not None]
    types = {op.request for op in operations} | {op.response for op in operations}
    types.discard(None)
    types.add(schemas.ErrorBody)
    ordered = sorted(types, key=lambda t: t.__name__)  # type: ignore[union-attr]
    refs, components = msgspec.json.schema_components(
        ordered, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(ordered, refs, strict=True))
    error_content = {"application/json": {"schema": ref_of[schemas.ErrorBody]}}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
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
        scope = op.scope
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
            "operationId": op.operation_id,
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
        paths.setdefault(op.path, {})[op.method.lower()] = entry
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
