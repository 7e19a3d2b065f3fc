"""The route table (service/http/routes.py) is what the app routes, documents and
enforces: the three views of a route cannot drift apart."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.http.app import Probes, create_app
from service.http.middleware import SCOPES, Auth
from service.http.openapi import build_openapi
from service.http.routes import ROUTES, scope_of
from service.http.serving import HOT_ROUTE
from service.settings import Settings

# One caller per scope, and one with every scope but one per scope.
TOKENS: dict[str, dict[str, Any]] = {
    f"only-{scope}": {"token": f"only-{scope}-".ljust(32, "x"), "scopes": [scope]}
    for scope in SCOPES
} | {
    f"all-but-{scope}": {
        "token": f"all-but-{scope}-".ljust(32, "y"),
        "scopes": sorted(SCOPES - {scope}),
    }
    for scope in SCOPES
}

# Path parameters that match each route's pattern.
EXAMPLES = {
    "slug": "S",
    "user_id": "1",
    "merchant_id": "1",
    "segment_type": "T",
    "promo_id": "P",
    "customer_id": "1",
    "token": "t",
}


def _app() -> web.Application:
    # The handlers' services are never reached: every request below is refused first.
    none = cast(Any, None)
    probes = Probes(none, none, none)
    settings = Settings(auth_tokens=orjson.dumps(TOKENS).decode())
    return create_app(
        segments=none, reports=none, audiences=none, promos=none, probes=probes, settings=settings
    )


def _path(template: str) -> str:
    for name, value in EXAMPLES.items():
        template = template.replace("{" + name + "}", value)
    return template


def test_every_route_of_the_table_is_routed_and_nothing_else() -> None:
    app = _app()
    routed = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    table = {(route.method, route.path) for route in ROUTES}
    assert len(table) == len(ROUTES)
    # The Swagger page's static files are the one route outside the table.
    assert routed - table == {("GET", "/docs/static")}
    assert table <= routed


def test_every_operation_is_documented_with_its_scope() -> None:
    paths = build_openapi()["paths"]
    documented = {(method.upper(), path) for path, item in paths.items() for method in item}
    api = [route for route in ROUTES if route.operation_id is not None]
    assert documented == {(route.method, route.path) for route in api}
    for route in api:
        op = paths[route.path][route.method.lower()]
        assert op["operationId"] == route.operation_id
        assert op["security"] == ([{"bearer": []}] if route.scope else []), route
        if route.scope:
            assert f"`{route.scope}` scope" in op["description"], route


def test_auth_takes_each_routes_scope_from_the_table() -> None:
    """By route object, HEAD with its GET: the prefix rule is only for unmatched paths."""
    app = _app()
    owners = [getattr(m, "__self__", None) for m in app.middlewares]
    auth = next(owner for owner in owners if isinstance(owner, Auth))
    table = {(route.method, route.path): route.scope for route in ROUTES}
    checked = 0
    for route in app.router.routes():
        assert route.resource is not None
        method = "GET" if route.method == "HEAD" else route.method
        key = (method, route.resource.canonical)
        if key in table:
            assert auth.scopes[route] == table[key], (route.method, key)
            checked += 1
    assert checked == len(ROUTES) + sum(route.method == "GET" for route in ROUTES)
    assert len(auth.scopes) == checked


def test_the_hot_route_is_a_read() -> None:
    # The front door (serving.py) gates its route with this scope, looked up at build.
    assert scope_of("GET", HOT_ROUTE) == "read"
    with pytest.raises(KeyError):
        scope_of("GET", "/v1/nothing")


@pytest.mark.parametrize("route", [r for r in ROUTES if r.scope], ids=lambda r: r.operation_id)
async def test_every_scope_of_the_table_is_enforced(route: Any) -> None:
    path = _path(route.path)
    methods = (route.method, "HEAD") if route.method == "GET" else (route.method,)
    async with TestClient(TestServer(_app(), port=0)) as client:
        for method in methods:
            async with client.request(method, path) as r:
                assert r.status == 401, (method, path)
            without = {"Authorization": "Bearer " + TOKENS[f"all-but-{route.scope}"]["token"]}
            async with client.request(method, path, headers=without) as r:
                assert r.status == 403, (method, path)
                if method != "HEAD":
                    body = await r.json()
                    assert body["error"]["details"] == {"required_scope": route.scope}
