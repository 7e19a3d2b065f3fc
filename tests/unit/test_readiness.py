"""/readyz: ready while this process can answer reads correctly, from either store.

| PostgreSQL | Redis | copy complete | answer |
| --- | --- | --- | --- |
| up | up | yes | 200 ready |
| up | up | no | 200 degraded: rebuilding (reads from PostgreSQL) |
| up | away | - | 200 degraded: cache_unavailable (reads from PostgreSQL) |
| away | up | yes | 200 degraded: storage_unavailable (reads from Redis, writes 503) |
| away | up | no | 503 unavailable |
| away | away | - | 503 unavailable |

The probe only looks (it never starts a rebuild) and each check is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import pytest
from aiohttp import web

from service.domain.service import SegmentService
from service.http.app import Probes

TIMEOUT_S = 0.2


class FakeSegments:
    """Only what the probe may use: ``cache_complete``.  Anything else (a rebuild) fails."""

    def __init__(self, complete: bool | None) -> None:
        self.complete = complete  # None: the check hangs

    async def cache_complete(self) -> bool:
        if self.complete is None:
            await asyncio.sleep(3600)
        return bool(self.complete)


def _ping(answer: bool | None) -> Any:
    async def ping() -> bool:
        if answer is None:  # a paused server: the call hangs
            await asyncio.sleep(3600)
        return bool(answer)

    return ping


async def _probe(
    store: bool | None, cache: bool | None, complete: bool | None
) -> tuple[int, dict[str, Any]]:
    probes = Probes(
        cast(SegmentService, FakeSegments(complete)),
        _ping(store),
        _ping(cache),
        timeout_s=TIMEOUT_S,
    )
    response = await probes.readyz(cast(web.Request, None))
    assert response.body is not None
    return response.status, json.loads(cast(bytes, response.body))


@pytest.mark.parametrize(
    ("store", "cache", "complete", "code", "status", "reasons"),
    [
        (True, True, True, 200, "ready", []),
        (True, True, False, 200, "degraded", ["rebuilding"]),
        (True, False, False, 200, "degraded", ["cache_unavailable"]),
        (False, True, True, 200, "degraded", ["storage_unavailable"]),
        (False, True, False, 503, "unavailable", ["storage_unavailable", "rebuilding"]),
        (False, False, False, 503, "unavailable", ["storage_unavailable", "cache_unavailable"]),
        # Hanging checks count as failed, within the probe's timeout.
        (None, True, True, 200, "degraded", ["storage_unavailable"]),
        (True, None, True, 200, "degraded", ["cache_unavailable"]),
        (True, True, None, 200, "degraded", ["rebuilding"]),
        (None, None, True, 503, "unavailable", ["storage_unavailable", "cache_unavailable"]),
        (None, True, None, 503, "unavailable", ["storage_unavailable", "rebuilding"]),
    ],
)
async def test_ready_while_either_store_can_answer(
    store: bool | None,
    cache: bool | None,
    complete: bool | None,
    code: int,
    status: str,
    reasons: list[str],
) -> None:
    started = time.monotonic()
    got_code, body = await _probe(store, cache, complete)
    took = time.monotonic() - started
    assert (got_code, body["status"], body["reasons"]) == (code, status, reasons), body
    assert body["checks"]["postgres"] is bool(store)
    assert body["checks"]["redis"] is bool(cache)
    assert body["checks"]["cache_complete"] is bool(cache and complete)
    # Two bounded steps at most (the pings together, then the marker).
    assert took < 2 * TIMEOUT_S + 0.3, took
