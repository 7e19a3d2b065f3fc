"""The end-to-end read/write tests again, with the cache on a 3-master Redis Cluster.

The cluster is started here from the bundled Valkey binary on loopback ports; the
PostgreSQL and the CP emulator of the session stack are shared.  ``settings``,
``container`` and ``server`` are redefined so that every e2e fixture built on them
(``clean``, ``http``, ``db``) talks to the cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
from aiohttp.test_utils import TestServer

from devstack import EmbeddedValkeyCluster
from service.bootstrap import Container, api_app, build
from service.settings import Settings
from tests.conftest import ApiTestServer


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkeyCluster]:
    cluster = EmbeddedValkeyCluster(tmp_path_factory.mktemp("cluster"), masters=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
async def settings(settings: Settings, valkey_cluster: EmbeddedValkeyCluster) -> Settings:
    return msgspec.structs.replace(settings, redis_url=valkey_cluster.url, redis_cluster=True)


@pytest.fixture(scope="session")
async def container(settings: Settings) -> AsyncIterator[Container]:
    c = await build(settings)
    yield c
    await c.close()


@pytest.fixture(scope="session")
async def server(container: Container) -> AsyncIterator[TestServer]:
    srv = ApiTestServer(api_app(container), host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()
