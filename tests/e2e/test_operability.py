"""Auth with scopes, rate limits, request ids, JSON access logs and metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp.test_utils import TestServer

from service.bootstrap import Container, api_app
from service.http.middleware import parse_tokens
from service.observability import JsonFormatter
from tests.conftest import ApiTestServer, scrape, serve_process

TOKENS = {
    "analytics": {"token": "a" * 32, "scopes": ["read", "write", "reports"]},
    "reader": {"token": "r" * 32, "scopes": ["read"]},
    "mps": {"token": "m" * 32, "scopes": ["sync"]},
}


async def _server(container: Container, **overrides: object) -> TestServer:
    settings = msgspec.structs.replace(container.settings, **overrides)
    app = api_app(container, settings)
    server = ApiTestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def secured(clean: Container) -> AsyncIterator[aiohttp.ClientSession]:
    server = await _server(clean, auth_tokens=orjson.dumps(TOKENS).decode())
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session
    await server.close()


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]['token']}"}


async def test_tokens_and_scopes(secured: aiohttp.ClientSession) -> None:
    async with secured.get("/v1/users/1/segments") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with secured.get("/v1/users/1/segments", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
    async with secured.get("/v1/users/1/segments", headers=bearer("reader")) as r:
        assert r.status == 200
    async with secured.post("/v1/segments", json={"slug": "A"}, headers=bearer("reader")) as r:
        assert r.status == 403
        body = await r.json()
        assert body["error"]["code"] == "forbidden"
        assert body["error"]["details"] == {"required_scope": "write"}
    async with secured.post("/v1/segments", json={"slug": "A"}, headers=bearer("analytics")) as r:
        assert r.status == 201
    async with secured.put(
        "/internal/v1/merchants/1/segments/X/customers",
        json={"customer_ids": [1]},
        headers=bearer("analytics"),
    ) as r:
        assert r.status == 403  # internal needs the internal scope
    async with secured.post(
        "/v1/merchants/1/segments/X/sync",
        json={"promo_id": "P", "end_date": str(dt.datetime.now(dt.UTC).date())},
        headers=bearer("mps"),
    ) as r:
        assert r.status == 404  # authorised; there is no such audience
    async with secured.get("/v1/promos/P", headers=bearer("mps")) as r:
        assert r.status == 404  # the sync scope reads promos too
    async with secured.delete("/v1/promos/P", headers=bearer("analytics")) as r:
        assert r.status == 403  # cancelling a promo is MPS's, not a writer's
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        async with secured.get(open_path) as r:
            assert r.status == 200, open_path


async def test_open_reads(clean: Container) -> None:
    server = await _server(clean, auth_tokens=orjson.dumps(TOKENS).decode(), auth_open_reads=True)
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as s:
        async with s.get("/v1/users/1/segments") as r:
            assert r.status == 200
        async with s.post("/v1/segments", json={"slug": "A"}) as r:
            assert r.status == 401
    await server.close()


def test_bad_token_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_tokens('{"x": {"token": "short", "scopes": ["read"]}}')
    with pytest.raises(ValueError):
        parse_tokens('{"x": {"token": "' + "t" * 20 + '", "scopes": ["admin"]}}')


async def test_rate_limit(clean: Container) -> None:
    server = await _server(clean, rate_limit_per_s=5.0, rate_limit_burst=5.0)
    statuses = []
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as s:
        for _ in range(8):
            async with s.get("/v1/users/1/segments") as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert (await r.json())["error"]["code"] == "rate_limited"
        async with s.get("/healthz") as r:
            assert r.status == 200  # probes are never limited
    await server.close()
    assert statuses[:5] == [200] * 5
    assert 429 in statuses[5:]


async def test_request_id_and_json_access_log(
    clean: Container, caplog: pytest.LogCaptureFixture
) -> None:
    server = await _server(clean, access_log="all")
    with caplog.at_level(logging.INFO, logger="segments.access"):
        async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
            async with http.get("/v1/users/42/segments", headers={"X-Request-Id": "req-123"}) as r:
                assert r.headers["X-Request-Id"] == "req-123"
            async with http.get("/v1/users/42/segments") as r:
                generated = r.headers["X-Request-Id"]
                assert len(generated) >= 16 and generated != "req-123"
    await server.close()
    records = [rec for rec in caplog.records if rec.name == "segments.access"]
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-123"
    assert line["route"] == "/v1/users/{user_id}/segments"
    assert line["status"] == 200 and line["level"] == "info"
    assert "duration_ms" in line
    assert records[1].request_id == generated  # type: ignore[attr-defined]


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    return [
        (rec.path, rec.status)  # type: ignore[attr-defined]
        for rec in caplog.records
        if rec.name == "segments.access"
    ]


async def test_access_log_by_default_only_errors(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """SEGMENTS_ACCESS_LOG=errors (the default): answers with status >= 400 only, on the
    front door's hot read and in the app alike."""
    with caplog.at_level(logging.INFO, logger="segments.access"):
        for path in ("/v1/users/42/segments", "/v1/segments", "/no/such", "/v1/users/0/segments"):
            async with http.get(path) as r:
                await r.read()
        async with http.post("/v1/segments", data="{") as r:
            assert r.status == 415
    assert _access_lines(caplog) == [
        ("/no/such", 404),
        ("/v1/users/0/segments", 422),
        ("/v1/segments", 415),
    ]


async def test_access_log_slow_requests_and_samples(
    clean: Container, caplog: pytest.LogCaptureFixture
) -> None:
    # Every request is slower than 1 µs: all are logged, whatever the mode.
    slow = await _server(clean, access_log_slow_ms=0.001)
    sampled = await _server(clean, access_log="sample:0.5")
    with caplog.at_level(logging.INFO, logger="segments.access"):
        async with aiohttp.ClientSession(base_url=str(slow.make_url(""))) as http:
            for path in ("/v1/users/1/segments", "/v1/segments"):
                async with http.get(path) as r:
                    assert r.status == 200
        assert _access_lines(caplog) == [("/v1/users/1/segments", 200), ("/v1/segments", 200)]
        caplog.clear()
        async with aiohttp.ClientSession(base_url=str(sampled.make_url(""))) as http:
            for user in range(1, 201):
                async with http.get(f"/v1/users/{user}/segments") as r:
                    assert r.status == 200
            async with http.get("/v1/segments/-") as r:
                assert r.status == 404
    await slow.close()
    await sampled.close()
    lines = _access_lines(caplog)
    assert ("/v1/segments/-", 404) in lines  # errors are always logged
    assert 60 <= len(lines) - 1 <= 140  # about half of the 200 reads


async def test_metrics_exposition(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/users/7/segments") as r:
        assert r.status == 200
    async with http.get("/metrics") as r:
        text = await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert (
        'segments_http_requests_total{method="GET",route="/v1/users/{user_id}/segments",status="200"}'
        in text
    )
    assert "segments_http_request_seconds_bucket" in text
    assert "segments_cache_complete 1.0" in text
    # The latency by status class, the count by exact status; the API's own families
    # only (no Kafka consumer here); no _created series; the build's labels.
    assert (
        'segments_http_request_seconds_count{method="GET",route="/v1/users/{user_id}/segments",'
        'status_class="2xx"}' in text
    )
    assert "segments_kafka" not in text
    assert "_created" not in text
    assert 'segments_build_info{aiohttp="' in text


async def test_unknown_methods_share_one_metric_label(http: aiohttp.ClientSession) -> None:
    # aiohttp's parser refuses methods it does not know (400, before any handler) but
    # takes WebDAV's and others: those share the label "other".
    async with http.request("BREW", "/no/such/route") as r:
        assert r.status == 400
    for method in ("PROPFIND", "MKCOL", "GET"):
        async with http.request(method, "/no/such/route") as r:
            assert r.status == 404
    async with http.get("/metrics") as r:
        text = await r.text()
    unmatched = [line for line in text.splitlines() if 'route="unmatched"' in line]
    assert any('method="other"' in line for line in unmatched)
    assert any('method="GET"' in line for line in unmatched)
    assert not any("PROPFIND" in line or "MKCOL" in line for line in unmatched)


def test_counter_bridge_copies_increments_once() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from service.observability import CounterBridge

    registry = CollectorRegistry()
    reads = Counter("t_reads_total", "t", ["source"], registry=registry)
    source = {"redis": 3, "postgres": 1}
    bridge = CounterBridge()
    bridge.add(lambda: dict(source), lambda name, n: reads.labels(name).inc(n))
    bridge.sync()
    source["redis"] = 10
    bridge.sync()
    bridge.sync()
    assert registry.get_sample_value("t_reads_total", {"source": "redis"}) == 10
    assert registry.get_sample_value("t_reads_total", {"source": "postgres"}) == 1


def test_workers_report_their_metrics_together(clean: Container, tmp_path: Path) -> None:
    """`serve --workers 2`: whichever worker answers a scrape reports both workers'
    requests (prometheus-client's multiprocess mode), and the cache's gauges."""
    reads = 60
    multiprocess = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with serve_process(clean.settings, "--workers", "2", env=multiprocess) as (proc, port):
        # A new connection each: the kernel spreads them over the two workers.
        for user in range(1, reads + 1):
            url = f"http://127.0.0.1:{port}/v1/users/{user}/segments"
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
        # Each worker copies its numbers into the shared files every second.
        deadline = time.monotonic() + 10
        while True:
            metrics = scrape(f"http://127.0.0.1:{port}/metrics")
            served = sum(
                value
                for labels, value in metrics.get("segments_http_requests_total", [])
                if labels["route"] == "/v1/users/{user_id}/segments" and labels["status"] == "200"
            )
            # Every read was answered from Redis (counted by the domain, bridged per
            # worker with the request metrics).
            from_redis = metrics.get("segments_user_reads_total")
            if (served, from_redis) == (reads, [({"source": "redis"}, float(reads))]):
                break
            assert time.monotonic() < deadline, (served, from_redis)
            time.sleep(0.3)
        pids = {labels.get("pid") for labels, _ in metrics["segments_cache_complete"]}
        assert metrics["segments_cache_complete"] == [({}, 1.0)], pids
        # Only the API's families, though each worker made all of them (some with a
        # value at import); one build_info for both workers.
        assert not [name for name in metrics if name.startswith("segments_kafka")]
        assert not [name for name in metrics if name.startswith("segments_cache_divergence")]
        assert [value for _, value in metrics["segments_build_info"]] == [1.0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


async def test_rebuild_progress_gauges(http: aiohttp.ClientSession, clean: Container) -> None:
    """A rebuild reports the users it wrote and how many PostgreSQL knew when it began
    (a user whose memberships are all gone is written too, as having none)."""
    from service.observability import API, registry

    async with http.post("/v1/segments", json={"slug": "GAUGED"}) as r:
        assert r.status == 201
    for user in (1, 2, 3):
        async with http.post(f"/v1/users/{user}/segments", json={"add": ["GAUGED"]}) as r:
            assert r.status == 200
    async with http.post("/v1/users/3/segments", json={"remove": ["GAUGED"]}) as r:
        assert r.status == 200
    await clean.cache.invalidate()
    assert await clean.segments.rebuild_cache()
    metrics = registry(API)
    assert metrics.get_sample_value("segments_cache_rebuild_users_written") == 3
    assert metrics.get_sample_value("segments_cache_rebuild_users_expected") == 3


async def test_pool_counts_callers_waiting_for_a_connection(clean: Container) -> None:
    from persistence.store import PgStore

    store = await PgStore.connect(clean.settings.database_url, min_size=1, max_size=1)
    try:
        async with store.connection():
            waiter = asyncio.create_task(store.ping())
            await asyncio.sleep(0.2)
            assert (store.in_use, store.waiting) == (1, 1)
        assert await waiter
        assert (store.in_use, store.waiting) == (0, 0)
    finally:
        await store.close()


_EXAMPLE_PARAMS = {
    "slug": "A",
    "user_id": "1",
    "merchant_id": "1",
    "segment_type": "X",
    "promo_id": "P",
    "customer_id": "1",
    "token": "not-a-token",
}


async def test_the_openapi_security_is_what_the_server_enforces(
    secured: aiohttp.ClientSession,
) -> None:
    """Swagger's Authorize button and generated clients trust `security`: every
    operation that declares a bearer token answers 401 without one, and no other does."""
    async with secured.get("/openapi.json") as r:
        document = await r.json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ids = []
    for template, item in document["paths"].items():
        path = template
        for name, value in _EXAMPLE_PARAMS.items():
            path = path.replace("{" + name + "}", value)
        for method, op in item.items():
            ids.append(op["operationId"])
            assert op["operationId"][0].islower() and "_" not in op["operationId"]
            async with secured.request(method.upper(), path) as r:
                protected = bool(op["security"])
                assert (r.status == 401) == protected, (method, template, r.status)
            if protected:
                assert {"401", "403", "429"} <= set(op["responses"]), (method, template)
                assert "scope" in op["description"]
    assert len(ids) == len(set(ids))
