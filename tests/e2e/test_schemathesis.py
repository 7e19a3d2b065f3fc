"""Schemathesis against the service's own /openapi.json (scenario 9 of the consistency issue).

For every documented operation, generated input must never get a 5xx, and every answer
must be documented: its status code, its media type and, for JSON, its body schema.

The server runs on pytest-asyncio's session loop in this process, while schemathesis
sends its requests synchronously (with `requests`).  So each operation's Hypothesis run
happens in a worker thread (`asyncio.to_thread`) and the loop keeps serving meanwhile.

Checks that are left out, and why:

* `positive_data_acceptance` (schema-valid input must get a 2xx): some rules cannot be
  written in JSON Schema, so a 422 for schema-valid input is legitimate: `expires_at`
  must be in the future and at most 10 years away, `ttl_seconds` and `expires_at`
  exclude each other, a slug cannot be both added and removed, a report period cannot
  be in the future.  Random slugs, tokens and user ids also name nothing that exists,
  which gets the documented 404/403.  `test_success_answers_match_the_schema` drives
  every operation to its success status instead.
* `negative_data_rejection` runs only on negative cases (it needs the generation mode).
* Negative mode is skipped for operations with nothing to break: no body and no
  constrained parameter (`GET /v1/segments`, `/healthz`, `/readyz`, and the report
  link, whose `token` is any string: a bad one is the documented 403).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import hypothesis
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.bootstrap import Container
from service.http.openapi import build_openapi

DOCUMENT = build_openapi()
OPERATIONS = [(method, path) for path, item in DOCUMENT["paths"].items() for method in item]

# Applied to every response, generated or explicit.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

MAX_EXAMPLES = 25
TIMEOUT_S = 10

# Served next to the API, not part of it.
NOT_API = {"/openapi.json", "/docs", "/docs/init.js", "/docs/static"}


def _can_be_invalid(method: str, path: str) -> bool:
    op = DOCUMENT["paths"][path][method]
    return "requestBody" in op or any(
        p["schema"] != {"type": "string"} for p in op.get("parameters", [])
    )


FUZZ = [
    pytest.param(method, path, mode, id=f"{method.upper()} {path} [{mode.value}]")
    for method, path in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or _can_be_invalid(method, path)
]


@pytest.fixture(scope="module")
async def api_schema(server: TestServer) -> schemathesis.BaseSchema:
    """The document as served at GET /openapi.json, loaded by schemathesis itself.

    The server under these tests runs without tokens, so the bearer requirement is taken
    out: left in, every "negative" case without an Authorization header would be
    expected to fail.  What `security` says is tested against a server with tokens in
    tests/e2e/test_operability.py."""
    url = str(server.make_url("/openapi.json"))
    served = await asyncio.to_thread(schemathesis.openapi.from_url, url)
    document = copy.deepcopy(served.raw_schema)
    document["components"].pop("securitySchemes", None)
    for item in document["paths"].values():
        for operation in item.values():
            operation.pop("security", None)
    schema = schemathesis.openapi.from_dict(document)
    schema.served_document = served.raw_schema  # type: ignore[attr-defined]
    return schema


def base_url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def in_thread(fn: Callable[[requests.Session], None]) -> None:
    def run() -> None:
        with requests.Session() as session:
            fn(session)

    await asyncio.to_thread(run)


def test_served_document_is_the_generated_one(api_schema: schemathesis.BaseSchema) -> None:
    # The parametrization below is built from build_openapi(); it must be what is served.
    assert api_schema.served_document == DOCUMENT  # type: ignore[attr-defined]


def test_every_route_is_documented(server: TestServer) -> None:
    """A route missing from /openapi.json is never fuzzed: the document must cover the app."""
    app: web.Application = server.app  # type: ignore[assignment]
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("HEAD", "OPTIONS") and route.resource is not None
    }
    routes = {(m, p) for m, p in routes if p not in NOT_API}
    documented = {(m.upper(), p) for m, p in OPERATIONS}
    undocumented = sorted(routes - documented)
    assert not undocumented, f"routes missing from /openapi.json: {undocumented}"
    unrouted = sorted(documented - routes)
    assert not unrouted, f"documented operations with no route: {unrouted}"


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ)
async def test_generated_input(
    api_schema: schemathesis.BaseSchema,
    server: TestServer,
    clean: Container,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema[path][method]
    base_url = base_url_of(server)
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS

    def fuzz(session: requests.Session) -> None:
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=base_url, session=session, checks=checks, timeout=TIMEOUT_S
            )

        check()

    await in_thread(fuzz)


def _this_month() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m")


def _tomorrow() -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()


CUSTOMERS = "/internal/v1/merchants/{merchant_id}/segments/{segment_type}/customers"
AUDIENCE = {"merchant_id": 7, "segment_type": "LOYAL"}

# One valid request per operation, in an order that makes each succeed: (method, path,
# path parameters, body, expected status).  A body of None sends none; `{token}` is
# filled from the report link.  Steps for operations missing from the document are
# skipped, and every documented operation must have a step.
SUCCESS_STEPS: list[tuple[str, str, dict[str, Any], Any, int]] = [
    ("get", "/healthz", {}, None, 200),
    ("get", "/readyz", {}, None, 200),
    ("get", "/metrics", {}, None, 200),
    (
        "post",
        "/v1/segments",
        {},
        {"slug": "VOICE_MESSAGES", "description": "voice", "auto_percent": 12.5},
        201,
    ),
    ("post", "/v1/segments", {}, {"slug": "OTHER"}, 201),
    ("get", "/v1/segments", {}, None, 200),
    ("get", "/v1/segments/{slug}", {"slug": "VOICE_MESSAGES"}, None, 200),
    (
        "patch",
        "/v1/segments/{slug}",
        {"slug": "VOICE_MESSAGES"},
        {"auto_percent": None, "description": "voice messages"},
        200,
    ),
    (
        "post",
        "/v1/users/{user_id}/segments",
        {"user_id": 1000},
        {"add": ["VOICE_MESSAGES", {"slug": "OTHER", "ttl_seconds": 3600}], "remove": []},
        200,
    ),
    ("get", "/v1/users/{user_id}/segments", {"user_id": 1000}, None, 200),
    ("get", "/v1/users/{user_id}/segments:explain", {"user_id": 1000}, None, 200),
    ("post", "/v1/users/segments:batch", {}, {"user_ids": [1000, 1001]}, 200),
    ("post", "/v1/reports/history", {}, {"period": _this_month(), "user_id": 1000}, 201),
    ("get", "/v1/reports/history/{token}", {"token": "{token}"}, None, 200),
    ("delete", "/v1/segments/{slug}", {"slug": "OTHER"}, None, 204),
    # Merchant audiences, promo sync and counters (the CP emulator answers the sync).
    ("put", CUSTOMERS, AUDIENCE, {"customer_ids": [1, 2, 3]}, 200),
    ("patch", CUSTOMERS, AUDIENCE, {"add": [4], "remove": [1]}, 200),
    ("get", "/v1/merchants/{merchant_id}/segments/{segment_type}", AUDIENCE, None, 200),
    (
        "post",
        "/v1/merchants/{merchant_id}/segments/{segment_type}/sync",
        AUDIENCE,
        {"promo_id": "PROMO1", "end_date": _tomorrow()},
        200,
    ),
    ("get", "/v1/customers/{customer_id}/sync-count", {"customer_id": 2}, None, 200),
    ("get", "/v1/promos/{promo_id}", {"promo_id": "PROMO1"}, None, 200),
    ("delete", "/v1/promos/{promo_id}", {"promo_id": "PROMO1"}, None, 204),
]


async def test_success_answers_match_the_schema(
    api_schema: schemathesis.BaseSchema, server: TestServer, clean: Container, cp: object
) -> None:
    """Random input rarely names an existing segment or a valid report link, so the
    fuzzing above mostly sees errors there: drive each operation to success once and
    validate that answer too (JSON bodies against their schema, the CSV's media type)."""
    covered = {(m, p) for m, p, *_ in SUCCESS_STEPS}
    missing = sorted(set(OPERATIONS) - covered)
    assert not missing, f"add a success step for these operations: {missing}"
    base_url = base_url_of(server)

    def drive(session: requests.Session) -> None:
        token = ""
        for method, path, params, body, status in SUCCESS_STEPS:
            if (method, path) not in OPERATIONS:
                continue
            params = {k: token if v == "{token}" else v for k, v in params.items()}
            kwargs: dict[str, Any] = {"path_parameters": params}
            if body is not None:
                kwargs.update(body=body, media_type="application/json")
            case = api_schema[path][method].Case(**kwargs)
            response = case.call_and_validate(
                base_url=base_url, session=session, checks=CHECKS, timeout=TIMEOUT_S
            )
            assert response.status_code == status, (method, path, response.text)
            if path == "/v1/reports/history":
                token = urlsplit(response.json()["url"]).path.rsplit("/", 1)[-1]

    await in_thread(drive)


# Inputs found by reading the code, that 25 random examples per operation do not reach:
# NUL characters (PostgreSQL text cannot hold U+0000) and year 0000 (`datetime` starts
# at year 1).  (method, path, path parameters, body, segments to create first.)
EDGE_INPUTS = [
    pytest.param(
        "post",
        "/v1/segments",
        {},
        {"slug": "A", "description": "a\u0000b"},
        [],
        id="POST /v1/segments description with U+0000 (schema-valid)",
    ),
    pytest.param(
        "patch",
        "/v1/segments/{slug}",
        {"slug": "A"},
        {"description": "a\u0000b"},
        ["A"],
        id="PATCH /v1/segments/{slug} description with U+0000 (schema-valid)",
    ),
    pytest.param(
        "get",
        "/v1/segments/{slug}",
        {"slug": "A\u0000"},
        None,
        [],
        id="GET /v1/segments/{slug} slug with U+0000",
    ),
    pytest.param(
        "patch",
        "/v1/segments/{slug}",
        {"slug": "A\u0000"},
        {"description": "x"},
        [],
        id="PATCH /v1/segments/{slug} slug with U+0000",
    ),
    pytest.param(
        "delete",
        "/v1/segments/{slug}",
        {"slug": "A\u0000"},
        None,
        [],
        id="DELETE /v1/segments/{slug} slug with U+0000",
    ),
    pytest.param(
        "post",
        "/v1/reports/history",
        {},
        {"period": "0000-01"},
        [],
        id="POST /v1/reports/history period 0000-01 (schema-valid)",
    ),
]


@pytest.mark.parametrize(("method", "path", "params", "body", "segments"), EDGE_INPUTS)
async def test_edge_input(
    api_schema: schemathesis.BaseSchema,
    server: TestServer,
    clean: Container,
    method: str,
    path: str,
    params: dict[str, Any],
    body: Any,
    segments: list[str],
) -> None:
    for slug in segments:
        await clean.segments.create_segment(slug, "", None)
    kwargs: dict[str, Any] = {"path_parameters": params}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = api_schema[path][method].Case(**kwargs)
    base_url = base_url_of(server)

    def send(session: requests.Session) -> None:
        case.call_and_validate(base_url=base_url, session=session, checks=CHECKS, timeout=TIMEOUT_S)

    await in_thread(send)
