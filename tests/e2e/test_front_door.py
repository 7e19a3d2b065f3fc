"""The front door of the hot read (service/http/serving.py) answers as the app does.

``server`` (tests/conftest.py) serves with the door, as ``segments serve`` does; here a
second server serves the same app without it, and every answer is compared."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from service.bootstrap import Container, api_app
from service.http.middleware import Handler
from service.http.serving import FrontDoor
from service.observability import flush_request_metrics, metrics_text
from service.settings import Settings
from tests.conftest import serve_process
from tests.e2e.test_experiments_api import create, update

PATHS = [
    "/v1/users/7/segments",  # the door
    "/v1/users/8/segments",  # the door: a user without segments
    "/v1/users/0/segments",  # the door, then the service's 400
    "/v1/users/99999999999999999999/segments",  # the door: out of range, 400
    "/v1/users/abc/segments",  # the app: not digits
    "/v1/users/%37/segments",  # an encoded digit: the same user either way
    "/v1/users/-7/segments",
    "/v1/users//segments",
    "/v1/users/7/segments/",
    "/v1/users/7/segmentsx",
    "/v1/users/segments",
]


@pytest.fixture
async def without_door(clean: Container) -> AsyncIterator[aiohttp.ClientSession]:
    plain = TestServer(api_app(clean), host="127.0.0.1")  # aiohttp's own runner
    await plain.start_server()
    async with aiohttp.ClientSession(base_url=str(plain.make_url(""))) as session:
        yield session
    await plain.close()


async def _answer(session: aiohttp.ClientSession, method: str, path: str) -> tuple[object, ...]:
    async with session.request(method, path, headers={"X-Request-Id": "req-1"}) as r:
        return r.status, r.headers.get("Content-Type"), r.headers["X-Request-Id"], await r.read()


async def test_every_answer_is_the_apps(
    http: aiohttp.ClientSession, without_door: aiohttp.ClientSession
) -> None:
    await create(http, "A")
    await create(http, "B")
    await update(http, 7, ["A", "B"])
    for method in ("GET", "HEAD", "POST"):
        for path in PATHS:
            assert await _answer(http, method, path) == await _answer(without_door, method, path), (
                method,
                path,
            )
    async with http.get("/v1/users/7/segments") as r:
        assert await r.json() == {"user_id": 7, "segments": ["A", "B"]}


async def test_door_requests_are_counted_under_the_route(http: aiohttp.ClientSession) -> None:
    def served() -> float:
        flush_request_metrics()
        text = metrics_text()[0].decode()
        prefix = (
            'segments_http_requests_total{method="GET",'
            'route="/v1/users/{user_id}/segments",status="200"} '
        )
        lines = text.splitlines()
        return sum(float(line[len(prefix) :]) for line in lines if line.startswith(prefix))

    before = served()
    for uid in range(1, 6):
        async with http.get(f"/v1/users/{uid}/segments") as r:
            assert r.status == 200
    assert served() == before + 5


async def test_a_door_wraps_its_layers_outermost_first() -> None:
    calls: list[str] = []

    def layer(name: str) -> Middleware:
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            calls.append(name)
            return await handler(request)

        return middleware

    async def read(raw: str) -> web.Response:
        calls.append(f"read {raw}")
        return web.Response()

    async def app(request: BaseRequest) -> web.StreamResponse:
        calls.append("app")
        return web.Response()

    handle = FrontDoor([layer("observe"), layer("auth")], read).before(app)
    await handle(make_mocked_request("GET", "/v1/users/42/segments"))
    await handle(make_mocked_request("GET", "/v1/users/x42/segments"))
    await handle(make_mocked_request("DELETE", "/v1/users/42/segments"))
    assert calls == ["observe", "auth", "read 42", "app", "app"]


def test_segments_serve_answers_and_stops_on_sigterm(settings: Settings) -> None:
    with serve_process(settings) as (proc, port):
        url = f"http://127.0.0.1:{port}/v1/users/1/segments"
        with urllib.request.urlopen(url, timeout=2) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


async def test_segments_serve_finishes_in_flight_requests_on_sigterm(
    clean: Container, db: asyncpg.Connection
) -> None:
    """SIGTERM while a request waits on PostgreSQL: it is answered, then the server
    exits 0.  (A request whose body is still arriving is cut instead: aiohttp drops
    data that comes after shutdown begins.)"""
    with serve_process(clean.settings) as (proc, port):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            lock = db.transaction()
            await lock.start()
            await db.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
            write = asyncio.create_task(http.post("/v1/segments", json={"slug": "IN_FLIGHT"}))
            await asyncio.sleep(0.5)  # the request now waits for the lock
            assert not write.done()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert proc.poll() is None, "the server quit with a request in flight"
            await lock.rollback()
            async with await write as r:
                assert r.status == 201, await r.text()
        assert await asyncio.to_thread(proc.wait, 20) == 0
