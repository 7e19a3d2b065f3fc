"""Bad input gets a clear JSON error with a stable code and changes nothing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from service.bootstrap import Container


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["message"]
    return resp.status, body["error"]["code"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b'{"add": "A"}', 422, "validation_error"),
        (b'{"add": ["A"], "extra": 1}', 422, "validation_error"),
        (b'{"add": ["has space"]}', 422, "validation_error"),
        (b'{"add": [{"slug": "A", "ttl_seconds": 0}]}', 422, "validation_error"),
        (
            b'{"add": [{"slug": "A", "ttl_seconds": 5, "expires_at": "2099-01-01T00:00:00Z"}]}',
            422,
            "validation_error",
        ),
        (
            b'{"add": [{"slug": "A", "expires_at": "2001-01-01T00:00:00Z"}]}',
            422,
            "validation_error",
        ),
    ],
)
async def test_bad_update_bodies(
    http: aiohttp.ClientSession, body: bytes, status: int, code: str
) -> None:
    async with http.post("/v1/segments", json={"slug": "A"}) as r:
        assert r.status == 201
    async with http.post(
        "/v1/users/5/segments", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert await error_of(r) == (status, code)
    async with http.get("/v1/users/5/segments") as r:
        assert (await r.json())["segments"] == []


async def test_wrong_content_type(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/segments", data="slug=A") as r:
        assert await error_of(r) == (415, "unsupported_media_type")


async def test_body_too_large(http: aiohttp.ClientSession) -> None:
    big = b'{"add": [' + b",".join([b'"AAAAAAAAAAAAAAAAAAAA"'] * 60_000) + b"]}"
    async with http.post(
        "/v1/users/5/segments", data=big, headers={"Content-Type": "application/json"}
    ) as r:
        assert await error_of(r) == (413, "payload_too_large")


async def test_chunked_body_is_refused_at_the_limit(server: TestServer, clean: Container) -> None:
    """A chunked body carries no Content-Length: it is refused once past the route's
    limit (1 MiB), without waiting for the rest (which this client never sends)."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"POST /v1/users/5/segments HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65_536
        for _ in range(24):  # 1.5 MiB, and no final chunk
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.split()[1] == b"413"
    finally:
        writer.close()


async def test_list_too_long(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/users/5/segments", json={"add": [f"S{i}" for i in range(1001)]}) as r:
        assert await error_of(r) == (422, "validation_error")


@pytest.mark.parametrize("uid", ["0", "-1", "abc", str(2**63), "1.5"])
async def test_bad_user_ids(http: aiohttp.ClientSession, uid: str) -> None:
    async with http.get(f"/v1/users/{uid}/segments") as r:
        assert await error_of(r) == (422, "validation_error")


async def test_bad_segment_bodies(http: aiohttp.ClientSession) -> None:
    for body in ({"slug": "-x"}, {"slug": "A", "auto_percent": 101}, {"slug": "A", "nope": 1}):
        async with http.post("/v1/segments", json=body) as r:
            assert await error_of(r) == (422, "validation_error")
    async with http.get("/v1/segments") as r:
        assert (await r.json())["segments"] == []


async def test_unknown_route_and_method(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing") as r:
        assert await error_of(r) == (404, "not_found")
    async with http.put("/v1/segments") as r:
        assert await error_of(r) == (405, "method_not_allowed")


async def test_openapi_and_docs(http: aiohttp.ClientSession) -> None:
    async with http.get("/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    add = doc["paths"]["/v1/users/{user_id}/segments"]["post"]
    assert add["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "UserSegmentsUpdate"
    )
    schema = doc["components"]["schemas"]["UserSegmentsUpdate"]
    assert schema["properties"]["add"]["maxItems"] == 1000
    async with http.get("/docs") as r:
        page = await r.text()
        assert "/docs/static/swagger-ui-bundle.js" in page and "http" not in page.split("<body>")[1]
    async with http.get("/docs/static/swagger-ui-bundle.js") as r:
        assert r.status == 200 and len(await r.read()) > 100_000


async def test_probes(http: aiohttp.ClientSession) -> None:
    async with http.get("/healthz") as r:
        assert r.status == 200
    async with http.get("/readyz") as r:
        body = await r.json()
        assert r.status == 200, body
        assert body["status"] == "ready" and body["reasons"] == []
        assert {k: body["checks"][k] for k in ("postgres", "redis", "cache_complete")} == {
            "postgres": True,
            "redis": True,
            "cache_complete": True,
        }


async def test_slow_body_times_out(
    http: aiohttp.ClientSession, server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from service.http import handlers

    monkeypatch.setattr(handlers, "BODY_READ_TIMEOUT_S", 0.5)
    url = server.make_url("")  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /v1/segments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"slug":'
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert b" 408 " in status_line
