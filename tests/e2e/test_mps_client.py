"""Contract test of ``service.client`` (the client MPS vendors) against the real API."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from service.client import (
    AudienceNotFound,
    CpUnavailable,
    InvalidSyncRequest,
    PromoConflict,
    SegmentsClient,
    SegmentsError,
    ServiceUnavailable,
    SyncResult,
)

BASE = "/internal/v1/merchants/{m}/segments/{t}/customers"
TOMORROW = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)


async def put(http: aiohttp.ClientSession, m: int, t: str, ids: list[int]) -> None:
    async with http.put(BASE.format(m=m, t=t), json={"customer_ids": ids}) as r:
        assert r.status == 200, await r.text()


@pytest.fixture
async def client(server: TestServer, http: aiohttp.ClientSession) -> AsyncIterator[SegmentsClient]:
    # ``http`` first empties the databases.
    async with SegmentsClient(str(server.make_url("")), timeout_s=10) as c:
        yield c


async def test_sync_is_idempotent_and_counts_once(
    client: SegmentsClient, http: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2, 3, 4])
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-1")
    assert isinstance(result, SyncResult)
    assert (result.promo_id, result.synced, result.skipped_over_threshold) == ("MPS-1", 4, 0)
    assert result.cp_segment_id
    assert await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-1") == result
    assert [await client.sync_count(c) for c in (1, 2, 3, 4, 5)] == [1, 1, 1, 1, 0]


async def test_error_answers_map_to_typed_errors(
    client: SegmentsClient, http: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2])
    with pytest.raises(AudienceNotFound) as nf:
        await client.sync_segments(3, "NOPE", TOMORROW, "MPS-2")
    assert (nf.value.status, nf.value.code) == (404, "audience_not_found")
    assert nf.value.details == {"audience": "3:NOPE"}

    with pytest.raises(InvalidSyncRequest) as invalid:
        await client.sync_segments(3, "LOYAL", dt.date(2001, 1, 1), "MPS-2")
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert invalid.value.details == {"end_date": "2001-01-01"}

    await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-2")
    with pytest.raises(PromoConflict) as conflict:
        await client.sync_segments(3, "LOYAL", dt.date(2099, 1, 1), "MPS-2")
    assert (conflict.value.status, conflict.value.code) == (409, "promo_conflict")
    assert conflict.value.details["end_date"] == TOMORROW.isoformat()
    assert all(isinstance(e.value, SegmentsError) for e in (nf, invalid, conflict))


async def test_cp_failure_raises_cp_unavailable_and_a_retry_succeeds(
    client: SegmentsClient, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2, 3])
    async with cp.post("/_admin/faults", json={"error_rate": 1, "error_status": 503}) as r:
        assert r.status == 200
    with pytest.raises(CpUnavailable) as exc:
        await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-3")
    assert (exc.value.status, exc.value.code) == (502, "cp_unavailable")
    assert exc.value.message
    assert [await client.sync_count(c) for c in (1, 2, 3)] == [0, 0, 0]
    # As the docstring promises, retrying the same promo_id later is safe.
    async with cp.post("/_admin/reset") as r:
        assert r.status == 204
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-3")
    assert (result.synced, result.skipped_over_threshold) == (3, 0)
    assert [await client.sync_count(c) for c in (1, 2, 3)] == [1, 1, 1]


async def test_closed_port_raises_service_unavailable() -> None:
    # A bound socket that does not listen refuses connections, and no one else can take
    # its port while we hold it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with SegmentsClient(f"http://127.0.0.1:{port}", timeout_s=5) as client:
            with pytest.raises(ServiceUnavailable) as exc:
                await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-4")
            assert exc.value.status is None and exc.value.code == "connection_error"
            with pytest.raises(ServiceUnavailable):
                await client.sync_count(1)


async def test_a_session_passed_in_stays_open(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [7])
    async with SegmentsClient(str(server.make_url("")), session=http, token="t0ken") as client:
        result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-5")
        assert result.synced == 1
    assert not http.closed
    with pytest.raises(RuntimeError):
        await client.sync_count(7)
