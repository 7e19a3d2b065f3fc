"""CpClient against the CP emulator, with injected faults (docs/cp-contract.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from service.cp.client import CpClient
from service.cp.emulator import create_emulator_app
from service.domain.errors import CpRejected, CpUnavailable

EXPIRES = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
async def cp() -> AsyncIterator[TestServer]:
    server = TestServer(create_emulator_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def admin(cp: TestServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(cp.make_url(""))) as session:
        yield session


@pytest.fixture
async def client(cp: TestServer) -> AsyncIterator[CpClient]:
    c = make_client(cp)
    yield c
    await c.close()


def make_client(cp: TestServer, **options: Any) -> CpClient:
    fast = {"timeout_s": 0.5, "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    return CpClient(str(cp.make_url("")), **{**fast, **options})


async def set_faults(admin: aiohttp.ClientSession, **faults: Any) -> None:
    async with admin.post("/_admin/faults", json=faults) as resp:
        assert resp.status == 200, await resp.text()


async def state(admin: aiohttp.ClientSession) -> dict[str, Any]:
    async with admin.get("/_admin/state") as resp:
        assert resp.status == 200
        return await resp.json()


async def only_segment(admin: aiohttp.ClientSession) -> dict[str, Any]:
    (segment,) = (await state(admin))["segments"]
    return segment


async def test_create_is_idempotent(client: CpClient, admin: aiohttp.ClientSession) -> None:
    first = await client.create_segment("m1/a 1", "Spring buyers", EXPIRES)
    later = EXPIRES + dt.timedelta(days=7)
    again = await client.create_segment("m1/a 1", "Spring buyers", later)
    other = await client.create_segment("m1/a2", "Others", EXPIRES)
    assert first == again != other
    async with admin.get(f"/v1/segments/{first}") as resp:
        body = await resp.json()
    assert body == {
        "segment_id": first,
        "external_id": "m1/a 1",
        "expires_at": "2030-01-08T00:00:00Z",
        "members": 0,
    }


async def test_put_answers_201_then_200(admin: aiohttp.ClientSession) -> None:
    body = {"name": "n", "expires_at": "2030-01-01T02:00:00+02:00"}
    async with admin.put("/v1/segments/x1", json=body) as resp:
        assert resp.status == 201
        created = await resp.json()
    async with admin.put("/v1/segments/x1", json=body) as resp:
        assert resp.status == 200
        assert await resp.json() == created
    assert created["expires_at"] == "2030-01-01T00:00:00Z"


async def test_add_members_splits_into_batches(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, max_batch=1000, max_concurrency=3)
    try:
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        await set_faults(admin, latency_ms=150)
        started = time.monotonic()
        await client.add_members(segment_id, range(5500), "sync-1")
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    segment = await only_segment(admin)
    assert (segment["members"], segment["applied_keys"]) == (5500, 6)
    # Six batches, three at a time: two rounds of latency, not one, not six.
    assert 0.3 <= elapsed < 0.8
    assert client.calls == {"ok": 7, "retry": 0, "failed": 0, "rejected": 0}


async def test_no_members_means_no_call(client: CpClient, admin: aiohttp.ClientSession) -> None:
    segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
    await client.add_members(segment_id, [], "sync-1")
    assert (await state(admin))["calls"]["received"] == 1


async def test_lost_answer_is_retried_and_applied_once(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, max_batch=1000)
    try:
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        await set_faults(admin, drop_next=1)
        await client.add_members(segment_id, list(range(2500)), "sync-1")
    finally:
        await client.close()
    st = await state(admin)
    assert st["calls"]["dropped"] == 1
    assert (st["segments"][0]["members"], st["segments"][0]["applied_keys"]) == (2500, 3)
    assert client.calls["retry"] == 1


async def test_caller_retry_with_same_key_applies_once(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, max_batch=1000, max_attempts=2)
    ids = [7, 7, *range(100, 2600)]
    try:
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        # Every batch is applied, and every answer is lost.
        await set_faults(admin, drop_after_apply_rate=1)
        with pytest.raises(CpUnavailable) as failed:
            await client.add_members(segment_id, ids, "sync-1")
        assert "Disconnected" in failed.value.details["last_error"]
        await set_faults(admin)
        await client.add_members(segment_id, ids, "sync-1")
    finally:
        await client.close()
    segment = await only_segment(admin)
    assert (segment["members"], segment["applied_keys"]) == (2501, 3)


async def test_transient_errors_succeed_on_third_attempt(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    await set_faults(admin, fail_next=2, error_status=503)
    segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
    await set_faults(admin, fail_next=1, error_status=429)
    await client.add_members(segment_id, [1, 2, 3], "sync-1")
    assert (await only_segment(admin))["members"] == 3
    assert client.calls == {"ok": 2, "retry": 3, "failed": 0, "rejected": 0}


async def test_persistent_503_gives_up_in_bounded_time(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    await set_faults(admin, error_rate=1, error_status=503)
    started = time.monotonic()
    with pytest.raises(CpUnavailable) as failed:
        await client.create_segment("m1:a1", "Audience", EXPIRES)
    assert time.monotonic() - started < 2
    assert failed.value.details["attempts"] == 4
    assert failed.value.details["last_error"] == "HTTP 503: injected fault"
    assert (await state(admin))["calls"]["received"] == 4
    assert client.calls == {"ok": 0, "retry": 3, "failed": 1, "rejected": 0}


async def test_4xx_is_rejected_without_retry(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    await set_faults(admin, fail_next=1, error_status=400)
    with pytest.raises(CpRejected) as rejected:
        await client.create_segment("m1:a1", "Audience", EXPIRES)
    assert rejected.value.details == {
        "op": "create_segment",
        "status": 400,
        "error": "injected fault",
    }
    with pytest.raises(CpRejected) as unknown:
        await client.add_members("seg_nope", [1], "sync-1")
    assert unknown.value.details["status"] == 404
    assert (await state(admin))["calls"]["received"] == 2
    assert client.calls == {"ok": 0, "retry": 0, "failed": 0, "rejected": 2}


async def test_key_reused_with_other_ids_is_rejected(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
    await client.add_members(segment_id, [1, 2], "sync-1")
    with pytest.raises(CpRejected) as rejected:
        await client.add_members(segment_id, [1, 3], "sync-1")
    assert rejected.value.details["status"] == 422
    assert (await only_segment(admin))["members"] == 2


async def test_slow_cp_times_out_then_gives_up(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, timeout_s=0.05, max_attempts=3)
    try:
        await set_faults(admin, latency_ms=300)
        started = time.monotonic()
        with pytest.raises(CpUnavailable) as failed:
            await client.create_segment("m1:a1", "Audience", EXPIRES)
        assert time.monotonic() - started < 1
    finally:
        await client.close()
    assert failed.value.details["attempts"] == 3
    assert "Timeout" in failed.value.details["last_error"]
    assert client.calls["retry"] == 2


async def test_delete_undoes_and_is_idempotent(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
    await client.delete_segment(segment_id)
    await client.delete_segment(segment_id)
    assert (await state(admin))["segments"] == []
    # The external id is free again: a new sync gets a new segment.
    assert await client.create_segment("m1:a1", "Audience", EXPIRES) != segment_id


async def test_emulator_enforces_the_members_contract(admin: aiohttp.ClientSession) -> None:
    async with admin.put(
        "/v1/segments/e1", json={"name": "n", "expires_at": "2030-01-01T00:00:00Z"}
    ) as r:
        segment_id = (await r.json())["segment_id"]
    url = f"/v1/segments/{segment_id}/members"

    async def post(ids: list[int], key: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Idempotency-Key": key} if key is not None else {}
        async with admin.post(url, json={"customer_ids": ids}, headers=headers) as resp:
            return resp.status, await resp.json()

    assert await post([1], None) == (400, {"error": "Idempotency-Key header is required"})
    status, body = await post(list(range(10_001)), "k0")
    assert (status, body["error"]) == (400, "customer_ids must hold 1..10000 ids, got 10001")
    assert (await post([], "k0"))[0] == 400
    assert (await post(list(range(10_000)), "k1"))[0] == 200
    first = await post([1, 10_000], "k2")
    assert first == (200, {"segment_id": segment_id, "added": 1, "members": 10_001})
    await post([10_001], "k3")
    # A replay gets the stored first answer, not today's member count.
    assert await post([1, 10_000], "k2") == first
    assert (await post([5], "k2"))[0] == 422
    assert (await post([1], "k"))[0] == 200
    async with admin.post("/v1/segments/nope/members", json={"customer_ids": [1]}) as resp:
        assert (resp.status, await resp.json()) == (404, {"error": "unknown segment"})


async def test_emulator_admin(admin: aiohttp.ClientSession) -> None:
    async with admin.post("/_admin/faults", json={"error_rate": 2}) as resp:
        assert resp.status == 400
    async with admin.post("/_admin/faults", json={"nope": 1}) as resp:
        assert resp.status == 400
    await set_faults(admin, fail_next=1)
    async with admin.get("/v1/segments/missing") as resp:
        assert resp.status == 503
    async with admin.get("/v1/segments/missing") as resp:
        assert (resp.status, await resp.json()) == (404, {"error": "unknown segment"})
    async with admin.post("/_admin/reset") as resp:
        assert resp.status == 204
    st = await state(admin)
    assert st["calls"] == {"received": 0, "injected_errors": 0, "dropped": 0}
    assert st["segments"] == []


async def test_every_attempt_is_timed_with_its_outcome(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    heard: list[tuple[str, str, float]] = []
    client = make_client(cp, on_request=lambda *attempt: heard.append(attempt))
    try:
        await set_faults(admin, fail_next=1, error_status=503, latency_ms=30)
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        await set_faults(admin, fail_next=1, error_status=400)
        with pytest.raises(CpRejected):
            await client.add_members(segment_id, [1], "sync-1")
    finally:
        await client.close()
    assert [(op, outcome) for op, outcome, _ in heard] == [
        ("create_segment", "retryable"),
        ("create_segment", "ok"),
        ("add_members", "rejected"),
    ]
    # The emulator's injected latency is in the first two.
    assert all(seconds >= 0.03 for _, _, seconds in heard[:2])


async def test_remove_members_removes_exactly_the_given_ids(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
    await client.add_members(segment_id, range(10), "sync-1:add")
    # 99 is no member: removing it is fine and changes nothing.
    await client.remove_members(segment_id, [2, 5, 7, 99], "sync-1:rm")
    segment = await only_segment(admin)
    assert segment["member_ids"] == [0, 1, 3, 4, 6, 8, 9]
    assert (segment["members"], segment["applied_keys"]) == (7, 2)
    assert segment["expires_at"] == "2030-01-01T00:00:00Z"
    # A repeat with the same key is answered from CP's key store, even after 5 is back.
    await client.add_members(segment_id, [5], "sync-2:add")
    await client.remove_members(segment_id, [2, 5, 7, 99], "sync-1:rm")
    segment = await only_segment(admin)
    assert segment["member_ids"] == [0, 1, 3, 4, 5, 6, 8, 9]
    assert segment["applied_keys"] == 3
    assert client.calls == {"ok": 5, "retry": 0, "failed": 0, "rejected": 0}


async def test_remove_from_unknown_segment_is_rejected(
    client: CpClient, admin: aiohttp.ClientSession
) -> None:
    with pytest.raises(CpRejected) as rejected:
        await client.remove_members("seg_gone", [1], "sync-1:rm")
    assert rejected.value.details == {
        "op": "remove_members",
        "status": 404,
        "error": "unknown segment",
    }
    await client.remove_members("seg_gone", [], "sync-1:rm")
    assert (await state(admin))["calls"]["received"] == 1


async def test_remove_lost_answer_is_retried_and_applied_once(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, max_batch=1000)
    try:
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        await client.add_members(segment_id, range(3000), "sync-1:add")
        await set_faults(admin, drop_next=1)
        await client.remove_members(segment_id, range(0, 3000, 2), "sync-1:rm")
    finally:
        await client.close()
    st = await state(admin)
    assert st["calls"]["dropped"] == 1
    (segment,) = st["segments"]
    assert segment["member_ids"] == list(range(1, 3000, 2))
    # Three add batches, two remove batches: the dropped one is stored once.
    assert segment["applied_keys"] == 5
    assert client.calls["retry"] == 1


async def test_remove_members_splits_into_batches(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, max_batch=1000, max_concurrency=3)
    try:
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        await client.add_members(segment_id, range(6000), "sync-1:add")
        await set_faults(admin, latency_ms=150)
        started = time.monotonic()
        await client.remove_members(segment_id, range(500, 6000), "sync-1:rm")
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    segment = await only_segment(admin)
    assert segment["member_ids"] == list(range(500))
    assert segment["applied_keys"] == 6 + 6
    # Six batches, three at a time: two rounds of latency.
    assert 0.3 <= elapsed < 0.8
    assert client.calls == {"ok": 13, "retry": 0, "failed": 0, "rejected": 0}


async def test_emulator_enforces_the_remove_contract(admin: aiohttp.ClientSession) -> None:
    async with admin.put(
        "/v1/segments/e1", json={"name": "n", "expires_at": "2030-01-01T00:00:00Z"}
    ) as r:
        segment_id = (await r.json())["segment_id"]

    async def post(call: str, ids: list[int], key: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Idempotency-Key": key} if key is not None else {}
        url = f"/v1/segments/{segment_id}/{call}"
        async with admin.post(url, json={"customer_ids": ids}, headers=headers) as resp:
            return resp.status, await resp.json()

    assert (await post("members", [1, 2, 3], "k:add:0"))[0] == 200
    assert await post("members/remove", [1], None) == (
        400,
        {"error": "Idempotency-Key header is required"},
    )
    assert (await post("members/remove", [], "k:rm:0"))[0] == 400
    assert (await post("members/remove", list(range(10_001)), "k:rm:0"))[0] == 400
    first = await post("members/remove", [1, 4], "k:rm:0")
    assert first == (200, {"segment_id": segment_id, "removed": 1, "members": 2})
    await post("members/remove", [2], "k:rm:1")
    # A replay gets the stored first answer, not today's member count.
    assert await post("members/remove", [1, 4], "k:rm:0") == first
    assert (await post("members/remove", [3], "k:rm:0"))[0] == 422
    # One key store for both calls: a key taken by an add is no remove's, and back.
    assert (await post("members/remove", [1, 2, 3], "k:add:0"))[0] == 422
    assert (await post("members", [1, 4], "k:rm:0"))[0] == 422
    async with admin.post(
        "/v1/segments/nope/members/remove",
        json={"customer_ids": [1]},
        headers={"Idempotency-Key": "k"},
    ) as resp:
        assert (resp.status, await resp.json()) == (404, {"error": "unknown segment"})
    segment = await only_segment(admin)
    assert (segment["member_ids"], segment["applied_keys"]) == ([3], 3)


def test_rate_limit_must_be_positive() -> None:
    # Built outside any event loop, as a process builds it at start-up.
    CpClient("http://127.0.0.1:9/", rate_limit_per_s=0.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rate_limit_per_s"):
            CpClient("http://127.0.0.1:9/", rate_limit_per_s=bad)


async def test_rate_limit_spaces_calls(cp: TestServer, admin: aiohttp.ClientSession) -> None:
    client = make_client(cp, rate_limit_per_s=20)
    try:
        started = time.monotonic()
        # One client's calls share the limit, however many run at once.
        await asyncio.gather(*(client.delete_segment(f"seg_{i}") for i in range(30)))
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    # A burst of 20, then 10 more at 20/s: 0.5 s (less a little for timer slack).
    assert elapsed >= 0.45
    assert (await state(admin))["calls"]["received"] == 30


async def test_retries_take_rate_tokens_too(cp: TestServer, admin: aiohttp.ClientSession) -> None:
    client = make_client(
        cp, rate_limit_per_s=10, max_attempts=15, backoff_base_s=0, backoff_max_s=0
    )
    try:
        await set_faults(admin, fail_next=14)
        started = time.monotonic()
        await client.create_segment("m1:a1", "Audience", EXPIRES)
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    # No backoff at all: only the limiter spaces the attempts (a burst of 10, 5 at 10/s).
    assert elapsed >= 0.45
    assert client.calls == {"ok": 1, "retry": 14, "failed": 0, "rejected": 0}


async def test_deadline_stops_retries(cp: TestServer, admin: aiohttp.ClientSession) -> None:
    client = make_client(cp, max_attempts=1000)
    try:
        await set_faults(admin, error_rate=1, error_status=503)
        started = time.monotonic()
        with pytest.raises(CpUnavailable) as failed:
            await client.create_segment("m1:a1", "Audience", EXPIRES, deadline=started + 0.5)
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    # A backoff that would end past the deadline gives up at once: up to backoff_max_s early.
    assert 0.4 <= elapsed < 0.7
    assert str(failed.value) == "CP did not answer create_segment before the sync deadline"
    details = failed.value.details
    assert (details["op"], details["deadline"]) == ("create_segment", True)
    assert details["last_error"] == "HTTP 503: injected fault"
    assert details["attempts"] == (await state(admin))["calls"]["received"] > 1
    assert client.calls["failed"] == 1


async def test_deadline_cuts_a_slow_attempt(cp: TestServer, admin: aiohttp.ClientSession) -> None:
    client = make_client(cp, timeout_s=2.0, max_batch=1000)
    try:
        segment_id = await client.create_segment("m1:a1", "Audience", EXPIRES)
        await set_faults(admin, latency_ms=1000)
        started = time.monotonic()
        with pytest.raises(CpUnavailable) as failed:
            await client.remove_members(
                segment_id, range(2500), "sync-1:rm", deadline=started + 0.5
            )
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    # Each batch's attempt times out at the deadline, not after timeout_s.
    assert 0.45 <= elapsed < 0.7
    details = failed.value.details
    assert (details["op"], details["deadline"], details["attempts"]) == ("remove_members", True, 1)
    assert "Timeout" in details["last_error"]


async def test_deadline_bounds_the_wait_for_a_rate_token(
    cp: TestServer, admin: aiohttp.ClientSession
) -> None:
    client = make_client(cp, rate_limit_per_s=1)
    try:
        await client.delete_segment("seg_1")
        started = time.monotonic()
        with pytest.raises(CpUnavailable) as failed:
            await client.delete_segment("seg_2", deadline=started + 0.2)
        elapsed = time.monotonic() - started
        with pytest.raises(CpUnavailable):
            await client.delete_segment("seg_3", deadline=time.monotonic() - 1)
    finally:
        await client.close()
    assert 0.15 <= elapsed < 0.4
    assert failed.value.details == {
        "op": "delete_segment",
        "deadline": True,
        "attempts": 0,
        "last_error": "no attempt could start before the deadline",
    }
    assert (await state(admin))["calls"]["received"] == 1
