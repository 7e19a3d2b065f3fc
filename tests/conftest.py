"""Test session: real PostgreSQL, Valkey and a Kafka-protocol broker on free ports.

The stack lives in a temp directory and is stopped at the end of the session, so the
tests never touch the dev data of `make run` or a developer's own servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from devstack import EmbeddedStack, free_port
from persistence.migrate import upgrade
from service.bootstrap import Container, api_app, build
from service.cp.emulator import create_emulator_app
from service.http.serving import ApiRunner
from service.settings import Settings, load_settings

TABLES = (
    "membership_history, memberships, auto_exclusions, user_versions, segment_history,"
    " segments, audiences, audience_members, audience_history, snapshot_parts, audience_pending,"
    " ingest_offsets, promo_syncs, sync_ledger, sync_customers, counter_outbox, cp_cleanup,"
    " cache_outbox"
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    # Valkey without persistence, as in production: a restart empties it.
    s = EmbeddedStack(tmp_path_factory.mktemp("stack"), fast=True, persistent=False)
    s.start()
    try:
        upgrade(s.postgres.url)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
async def cp_server() -> AsyncIterator[TestServer]:
    """The CP emulator: a real HTTP server standing in for the external CP."""
    srv = TestServer(create_emulator_app(), host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture(scope="session")
async def settings(stack: EmbeddedStack, cp_server: TestServer) -> Settings:
    return load_settings(
        {
            **stack.env(),
            "SEGMENTS_FALLBACK_CONCURRENCY": "8",
            "SEGMENTS_CP_URL": str(cp_server.make_url("")),
            "SEGMENTS_CP_MAX_ATTEMPTS": "3",
            "SEGMENTS_CP_TIMEOUT_S": "0.5",
            "SEGMENTS_SYNC_THRESHOLD": "2",
        }
    )


@pytest.fixture(scope="session")
async def container(settings: Settings) -> AsyncIterator[Container]:
    c = await build(settings)
    yield c
    await c.close()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def cp(cp_server: TestServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the CP emulator's admin API, reset before each test."""
    async with aiohttp.ClientSession(base_url=str(cp_server.make_url(""))) as session:
        async with session.post("/_admin/reset") as r:
            assert r.status == 204
        yield session


@pytest.fixture
async def clean(container: Container, db: asyncpg.Connection) -> Container:
    """Empty both stores and mark the (empty) cache complete, as after a rebuild."""
    await db.execute(f"TRUNCATE {TABLES} CASCADE")
    # A fault test may have restarted Valkey: start from fresh connections, not ones
    # the old server closed (each would fail once).
    pool = getattr(container.cache._r, "connection_pool", None)  # a cluster has one per node
    if pool is not None:
        await pool.disconnect()
    await container.cache._r.flushall()
    # A rebuild returns False when one that a previous test's reads started still holds
    # the lease, or when a Redis call failed for a moment (a timeout on a loaded
    # machine); the service retries in both cases, and so does this set-up.
    for _ in range(40):
        if await container.segments.rebuild_cache():
            break
        await asyncio.sleep(0.25)
    assert await container.segments.cache_complete()
    return container


class ApiTestServer(TestServer):
    """A TestServer served as ``segments serve`` serves the API: with its runner, so
    the front door of the hot read (service/http/serving.py) is under test too."""

    async def _make_runner(self, **kwargs: Any) -> ApiRunner:
        return ApiRunner(self.app, **kwargs)


@pytest.fixture(scope="session")
async def server(container: Container) -> AsyncIterator[TestServer]:
    app = api_app(container)
    srv = ApiTestServer(app, host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
async def http(server: TestServer, clean: Container) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A Prometheus text page (a process's /metrics): sample name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


@contextlib.contextmanager
def serve_process(
    settings: Settings, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`segments serve` as a process on the session's stores (and a free port), once
    it answers /healthz; killed on the way out if the test has not stopped it."""
    port = free_port()
    full_env = {
        **os.environ,
        "SEGMENTS_DATABASE_URL": settings.database_url,
        "SEGMENTS_REDIS_URL": settings.redis_url,
        "SEGMENTS_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    # Our own interpreter and module, fixed arguments.
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args], env=full_env
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, f"serve exited with {proc.returncode}"
                assert time.monotonic() < deadline, "serve did not answer within 30 s"
                time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
