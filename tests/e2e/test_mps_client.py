"""Contract test of the promo sync part of the client package (clients/python,
``user_segments_client``, the client MPS uses) against the real API.

The retry tests and a few mapping tests use a tiny scripted aiohttp server instead: it
answers exactly the statuses and headers a test needs, which the real service only gives
under load or races.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.bootstrap import Container, api_app
from tests.conftest import ApiTestServer

# The package from the source tree, as tests/e2e/test_client_package.py imports it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from user_segments_client import (
    AudienceNotFound,
    CpUnavailable,
    Forbidden,
    InvalidRequest,
    NotFound,
    PromoCancelled,
    PromoConflict,
    PromoNotFound,
    PromoStatus,
    RateLimited,
    SegmentsClient,
    SegmentsError,
    ServiceUnavailable,
    SyncInProgress,
    SyncResult,
    Unauthorized,
)

BASE = "/internal/v1/merchants/{m}/segments/{t}/customers"
TODAY = dt.datetime.now(dt.UTC).date()
TOMORROW = TODAY + dt.timedelta(days=1)


async def put(http: aiohttp.ClientSession, m: int, t: str, ids: list[int]) -> None:
    async with http.put(BASE.format(m=m, t=t), json={"customer_ids": ids}) as r:
        assert r.status == 200, await r.text()


async def cp_segments(cp: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with cp.get("/_admin/state") as r:
        assert r.status == 200
        segments: list[dict[str, Any]] = (await r.json())["segments"]
        return segments


async def cp_calls(cp: aiohttp.ClientSession) -> int:
    """How many /v1 calls CP has received."""
    async with cp.get("/_admin/state") as r:
        assert r.status == 200
        received: int = (await r.json())["calls"]["received"]
        return received


@pytest.fixture
async def client(
    server: TestServer, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> AsyncIterator[SegmentsClient]:
    # ``http`` first empties the databases; ``cp`` resets the CP emulator (a fault left
    # on by an earlier test would fail these in any order).
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


async def test_a_repeat_brings_cp_up_to_date_and_still_counts_once(
    client: SegmentsClient, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2])
    await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-6")
    # A new end_date and a changed audience are an update of the promo, not a conflict.
    later = TOMORROW + dt.timedelta(days=7)
    await put(http, 3, "LOYAL", [2, 3, 4])
    result = await client.sync_segments(3, "LOYAL", later, "MPS-6")
    assert (result.synced, result.skipped_over_threshold) == (3, 0)
    [segment] = await cp_segments(cp)
    assert (segment["segment_id"], segment["member_ids"]) == (result.cp_segment_id, [2, 3, 4])
    status = await client.promo_status("MPS-6")
    assert (status.state, status.end_date) == ("synced", later)
    assert (status.synced, status.skipped_over_threshold) == (3, 0)
    assert status.cp_segment_id == result.cp_segment_id
    # Customer 1 left the promo and no longer counts; the others count once.
    assert [await client.sync_count(c) for c in (1, 2, 3, 4)] == [0, 1, 1, 1]
    # Nothing changed since: the same answer, without a call to CP.
    received = await cp_calls(cp)
    assert await client.sync_segments(3, "LOYAL", later, "MPS-6") == result
    assert await cp_calls(cp) == received


async def test_nobody_over_the_threshold_gives_no_cp_segment(
    client: SegmentsClient, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    # The test settings allow two active promo segments per customer.
    await put(http, 3, "LOYAL", [1, 2])
    for promo in ("MPS-7a", "MPS-7b"):
        assert (await client.sync_segments(3, "LOYAL", TOMORROW, promo)).synced == 2
    assert len(await cp_segments(cp)) == 2
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-7c")
    assert (result.synced, result.skipped_over_threshold, result.cp_segment_id) == (0, 2, None)
    assert len(await cp_segments(cp)) == 2  # nothing created in CP
    status = await client.promo_status("MPS-7c")
    assert (status.synced, status.skipped_over_threshold, status.cp_segment_id) == (0, 2, None)


async def test_error_answers_map_to_typed_errors(
    client: SegmentsClient, http: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2])
    await put(http, 4, "LOYAL", [1, 2])
    with pytest.raises(AudienceNotFound) as nf:
        await client.sync_segments(3, "NOPE", TOMORROW, "MPS-2")
    assert (nf.value.status, nf.value.code) == (404, "audience_not_found")
    assert nf.value.details == {"audience": "3:NOPE"}

    with pytest.raises(InvalidRequest) as invalid:
        await client.sync_segments(3, "LOYAL", dt.date(2001, 1, 1), "MPS-2")
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert invalid.value.details["end_date"] == "2001-01-01"
    with pytest.raises(InvalidRequest) as too_far:
        await client.sync_segments(3, "LOYAL", TODAY + dt.timedelta(days=400), "MPS-2")
    assert (too_far.value.status, too_far.value.code) == (422, "validation_error")

    await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-2")
    with pytest.raises(PromoConflict) as conflict:
        await client.sync_segments(4, "LOYAL", TOMORROW, "MPS-2")
    assert (conflict.value.status, conflict.value.code) == (409, "promo_conflict")

    with pytest.raises(PromoNotFound) as unknown:
        await client.promo_status("MPS-unknown")
    assert (unknown.value.status, unknown.value.code) == (404, "promo_not_found")
    with pytest.raises(PromoNotFound):
        await client.cancel_promo("MPS-unknown")
    assert all(isinstance(e.value, SegmentsError) for e in (nf, invalid, conflict, unknown))


async def test_promo_status_after_a_sync(
    client: SegmentsClient, http: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2, 3])
    before = dt.datetime.now(dt.UTC)
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-8")
    status = await client.promo_status("MPS-8")
    assert isinstance(status, PromoStatus)
    assert (status.promo_id, status.merchant_id, status.segment_type) == ("MPS-8", 3, "LOYAL")
    assert (status.state, status.end_date) == ("synced", TOMORROW)
    assert (status.synced, status.skipped_over_threshold) == (3, 0)
    assert status.cp_segment_id == result.cp_segment_id
    assert status.attempts >= 1 and status.last_error is None
    assert status.updated_at.tzinfo is not None
    assert status.updated_at >= before - dt.timedelta(seconds=5)  # allow clock granularity


async def test_cancel_promo_releases_counts_and_the_cp_segment(
    client: SegmentsClient, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2])
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-9")
    assert [s["segment_id"] for s in await cp_segments(cp)] == [result.cp_segment_id]
    await client.cancel_promo("MPS-9")
    assert (await client.promo_status("MPS-9")).state == "cancelled"
    assert await cp_segments(cp) == []
    assert [await client.sync_count(c) for c in (1, 2)] == [0, 0]
    await client.cancel_promo("MPS-9")  # cancelling again is fine
    assert (await client.promo_status("MPS-9")).state == "cancelled"


async def test_sync_after_cancel_raises_promo_cancelled(
    client: SegmentsClient, http: aiohttp.ClientSession
) -> None:
    await put(http, 3, "LOYAL", [1, 2])
    await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-10")
    await client.cancel_promo("MPS-10")
    with pytest.raises(PromoCancelled) as exc:
        await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-10")
    assert (exc.value.status, exc.value.code) == (409, "promo_cancelled")
    assert [await client.sync_count(c) for c in (1, 2)] == [0, 0]


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
    failed = await client.promo_status("MPS-3")
    assert failed.state == "failed"
    assert failed.attempts >= 1 and failed.last_error
    # As the docstring promises, retrying the same promo_id later is safe.
    async with cp.post("/_admin/reset") as r:
        assert r.status == 204
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "MPS-3")
    assert (result.synced, result.skipped_over_threshold) == (3, 0)
    assert [await client.sync_count(c) for c in (1, 2, 3)] == [1, 1, 1]
    assert (await client.promo_status("MPS-3")).state == "synced"


MPS_TOKEN, READER_TOKEN = "m" * 32, "r" * 32
TOKENS = {
    "mps": {"token": MPS_TOKEN, "scopes": ["sync"]},
    "reader": {"token": READER_TOKEN, "scopes": ["read"]},
}


@pytest.fixture
async def secured_url(clean: Container) -> AsyncIterator[str]:
    """The API with tokens configured, as tests/e2e/test_operability.py starts it."""
    settings = msgspec.structs.replace(clean.settings, auth_tokens=orjson.dumps(TOKENS).decode())
    srv = ApiTestServer(api_app(clean, settings), host="127.0.0.1")
    await srv.start_server()
    yield str(srv.make_url(""))
    await srv.close()


async def test_auth_errors_map_to_typed_errors(secured_url: str) -> None:
    for token in (None, "nope-" * 8):
        async with SegmentsClient(secured_url, timeout_s=10, token=token) as anonymous:
            with pytest.raises(Unauthorized) as unauthorized:
                await anonymous.sync_segments(3, "LOYAL", TOMORROW, "MPS-11")
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    async with SegmentsClient(secured_url, timeout_s=10, token=READER_TOKEN) as c:
        with pytest.raises(Forbidden) as forbidden:
            await c.sync_segments(3, "LOYAL", TOMORROW, "MPS-11")
        assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")
        assert forbidden.value.details == {"required_scope": "sync"}
    async with SegmentsClient(secured_url, timeout_s=10, token=MPS_TOKEN) as c:
        with pytest.raises(AudienceNotFound):  # authorised; there is no such audience
            await c.sync_segments(3, "LOYAL", TOMORROW, "MPS-11")


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


# --- Retries, against a scripted server ------------------------------------------------

Answer = tuple[int, dict[str, Any] | None, dict[str, str]]
"""(status, JSON body or None for an empty one, headers)."""

SYNCED = {"promo_id": "P-1", "synced": 2, "skipped_over_threshold": 0, "cp_segment_id": "cp-1"}
STATUS = {
    "promo_id": "P-1",
    "merchant_id": 3,
    "segment_type": "LOYAL",
    "end_date": "2030-01-31",
    "state": "synced",
    "synced": 2,
    "skipped_over_threshold": 0,
    "cp_segment_id": "cp-1",
    "attempts": 1,
    "last_error": None,
    "updated_at": "2030-01-01T12:00:00+00:00",
}


def error(status: int, code: str, retry_after: str | None = None) -> Answer:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return status, {"error": {"code": code, "message": code, "details": {}}}, headers


@contextlib.asynccontextmanager
async def scripted(answers: Sequence[Answer]) -> AsyncIterator[tuple[str, list[str]]]:
    """A server giving ``answers`` in turn (the last one again once they run out); yields
    its URL and the "METHOD path" of each request it got."""
    calls: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append(f"{request.method} {request.path}")
        status, body, headers = answers[min(len(calls), len(answers)) - 1]
        return web.Response(
            status=status,
            body=None if body is None else orjson.dumps(body),
            headers=headers,
            content_type=None if body is None else "application/json",
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield str(srv.make_url("")), calls
    finally:
        await srv.close()


async def test_a_503_with_retry_after_is_retried() -> None:
    answers = [error(503, "storage_unavailable", retry_after="0"), (200, SYNCED, {})]
    async with scripted(answers) as (url, calls), SegmentsClient(url, timeout_s=10) as c:
        result = await c.sync_segments(3, "LOYAL", dt.date(2030, 1, 31), "P-1")
    assert result == SyncResult("P-1", 2, 0, "cp-1")
    assert calls == ["POST /v1/merchants/3/segments/LOYAL/sync"] * 2


async def test_retries_give_up_after_max_attempts() -> None:
    answers = [error(503, "storage_unavailable", retry_after="0")]
    async with (
        scripted(answers) as (url, calls),
        SegmentsClient(url, timeout_s=10, max_attempts=3) as c,
    ):
        with pytest.raises(ServiceUnavailable) as exc:
            await c.sync_segments(3, "LOYAL", dt.date(2030, 1, 31), "P-1")
    assert (exc.value.status, exc.value.code, exc.value.retry_after_s) == (
        503,
        "storage_unavailable",
        0.0,
    )
    assert len(calls) == 3


async def test_sync_in_progress_and_rate_limits_are_retried() -> None:
    answers = [error(409, "sync_in_progress", retry_after="0"), (204, None, {})]
    async with scripted(answers) as (url, calls), SegmentsClient(url, timeout_s=10) as c:
        await c.cancel_promo("P-1")
    assert calls == ["DELETE /v1/promos/P-1"] * 2

    # Without Retry-After the client backs off by itself, briefly.
    answers = [error(429, "rate_limited"), (200, STATUS, {})]
    async with scripted(answers) as (url, calls), SegmentsClient(url, timeout_s=10) as c:
        status = await c.promo_status("P-1")
    assert len(calls) == 2
    assert status == PromoStatus(
        promo_id="P-1",
        merchant_id=3,
        segment_type="LOYAL",
        end_date=dt.date(2030, 1, 31),
        state="synced",
        synced=2,
        skipped_over_threshold=0,
        cp_segment_id="cp-1",
        attempts=1,
        last_error=None,
        updated_at=dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC),
    )

    answers = [error(409, "sync_in_progress", retry_after="1")]
    async with (
        scripted(answers) as (url, calls),
        SegmentsClient(url, timeout_s=10, max_attempts=2, max_retry_wait_s=0.01) as c,
    ):
        with pytest.raises(SyncInProgress) as busy:
            await c.promo_status("P-1")
    assert (busy.value.status, busy.value.retry_after_s, len(calls)) == (409, 1.0, 2)

    answers = [error(429, "rate_limited", retry_after="0")]
    async with scripted(answers) as (url, calls), SegmentsClient(url, max_attempts=1) as c:
        with pytest.raises(RateLimited):
            await c.sync_count(1)
    assert len(calls) == 1  # max_attempts=1: no retry


async def test_a_long_retry_after_is_capped() -> None:
    answers = [error(503, "storage_unavailable", retry_after="3600"), (200, SYNCED, {})]
    started = time.monotonic()
    async with (
        scripted(answers) as (url, calls),
        SegmentsClient(url, timeout_s=10, max_retry_wait_s=0.05) as c,
    ):
        await c.sync_segments(3, "LOYAL", dt.date(2030, 1, 31), "P-1")
    assert len(calls) == 2 and time.monotonic() - started < 5


async def test_cp_errors_and_other_answers_are_not_retried() -> None:
    for answer, cls in [
        (error(502, "cp_unavailable"), CpUnavailable),
        (error(409, "promo_conflict"), PromoConflict),
        (error(404, "not_found"), NotFound),  # a route the service lacks: not a promo's
        (error(401, "unauthorized"), Unauthorized),
        (error(403, "forbidden"), Forbidden),
    ]:
        async with scripted([answer]) as (url, calls), SegmentsClient(url, timeout_s=10) as c:
            with pytest.raises(cls) as exc:
                await c.promo_status("P-1")
        assert type(exc.value) is cls and exc.value.status == answer[0]
        assert len(calls) == 1, answer
