"""Test session: real PostgreSQL, Valkey and a Kafka-protocol broker on free ports.

The stack lives in a temp directory and is stopped at the end of the session, so the
tests never touch the dev data of `make run` or a developer's own servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from persistence.migrate import upgrade
from service.bootstrap import Container, build
from service.devstack import EmbeddedStack
from service.http.app import Probes, create_app
from service.settings import Settings, load_settings

TABLES = "membership_history, memberships, auto_exclusions, user_versions, segments"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    s = EmbeddedStack(tmp_path_factory.mktemp("stack"), fast=True)
    s.start()
    try:
        upgrade(s.postgres.url)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def settings(stack: EmbeddedStack) -> Settings:
    return load_settings({**stack.env(), "SEGMENTS_FALLBACK_CONCURRENCY": "8"})


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
async def clean(container: Container, db: asyncpg.Connection) -> Container:
    """Empty both stores and mark the (empty) cache complete, as after a rebuild."""
    await db.execute(f"TRUNCATE {TABLES} CASCADE")
    await container.cache._r.flushall()
    assert await container.segments.rebuild_cache()
    return container


@pytest.fixture(scope="session")
async def server(container: Container) -> AsyncIterator[TestServer]:
    app = create_app(
        container.segments,
        container.reports,
        Probes(container.segments, container.store.ping, container.cache.ping),
        max_body_bytes=container.settings.max_body_bytes,
    )
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
async def http(server: TestServer, clean: Container) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session
