"""Merchant audiences, promo sync to the CP emulator, and per-customer counters."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import aiohttp
import asyncpg

from service.bootstrap import Container

BASE = "/internal/v1/merchants/{m}/segments/{t}/customers"
TOMORROW = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()


async def put(http: aiohttp.ClientSession, m: int, t: str, ids: list[int]) -> dict[str, Any]:
    async with http.put(BASE.format(m=m, t=t), json={"customer_ids": ids}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def sync(
    http: aiohttp.ClientSession, m: int, t: str, promo: str, end: str = TOMORROW
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"/v1/merchants/{m}/segments/{t}/sync", json={"promo_id": promo, "end_date": end}
    ) as r:
        return r.status, await r.json()


async def count(http: aiohttp.ClientSession, cid: int) -> int:
    async with http.get(f"/v1/customers/{cid}/sync-count") as r:
        assert r.status == 200
        body = await r.json()
        assert body["customer_id"] == cid
        return body["active_synced_segments"]


async def cp_state(cp: aiohttp.ClientSession) -> dict[str, Any]:
    async with cp.get("/_admin/state") as r:
        return await r.json()


async def test_replace_patch_and_get(http: aiohttp.ClientSession, db: asyncpg.Connection) -> None:
    first = await put(http, 7, "LOYAL", [3, 1, 2, 2])
    assert (first["customers"], first["version"]) == (3, 1)
    again = await put(http, 7, "LOYAL", [4, 5])
    assert (again["customers"], again["version"]) == (2, 2)
    async with http.patch(
        BASE.format(m=7, t="LOYAL"), json={"add": [6, 4], "remove": [5, 99]}
    ) as r:
        body = await r.json()
        assert (body["customers"], body["version"]) == (2, 3)
    async with http.get("/v1/merchants/7/segments/LOYAL") as r:
        got = await r.json()
        assert (got["merchant_id"], got["segment_type"], got["customers"]) == (7, "LOYAL", 2)
        assert got["version"] == 3 and got["updated_at"].endswith("Z")
    members = await db.fetch(
        "SELECT customer_id FROM audience_members m JOIN audiences a USING (generation)"
        " ORDER BY customer_id"
    )
    assert [r[0] for r in members] == [4, 6]
    # The replaced generation's rows are gone.
    assert await db.fetchval("SELECT count(*) FROM audience_members") == 2
    ops = await db.fetch("SELECT operation, added, removed FROM audience_history ORDER BY id")
    assert [tuple(r) for r in ops][-1] == ("patch", 1, 1)


async def test_audience_bad_input(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/merchants/7/segments/NOPE") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "audience_not_found"
    for body in ({"customer_ids": [0]}, {"customer_ids": ["x"]}, {"ids": []}):
        async with http.put(BASE.format(m=7, t="A"), json=body) as r:
            assert r.status == 422
    async with http.patch(BASE.format(m=7, t="A"), json={"add": [1], "remove": [1]}) as r:
        assert r.status == 422
    async with http.put(BASE.format(m=0, t="A"), json={"customer_ids": [1]}) as r:
        assert r.status == 422
    async with http.put(BASE.format(m=7, t="-bad"), json={"customer_ids": [1]}) as r:
        assert r.status == 422
    async with http.get("/v1/merchants/7/segments/A") as r:
        assert r.status == 404


async def test_large_replace_in_one_request(http: aiohttp.ClientSession) -> None:
    ids = list(range(1, 200_001))
    body = await put(http, 9, "BIG", ids)
    assert body["customers"] == 200_000


async def test_threshold_over_three_promos(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    # Threshold is 2 in the test settings.
    await put(http, 1, "X", [1, 2, 3, 4, 5])
    await put(http, 1, "Y", [3, 4, 5, 6, 7, 8])
    await put(http, 1, "Z", [1, 2, 3, 4, 5, 6, 7, 8])
    assert (await sync(http, 1, "X", "P1"))[1]["synced"] == 5
    assert (await sync(http, 1, "Y", "P2"))[1]["synced"] == 6
    status, body = await sync(http, 1, "Z", "P3")
    assert status == 200
    assert (body["synced"], body["skipped_over_threshold"]) == (5, 3)
    assert [await count(http, c) for c in range(1, 10)] == [2] * 8 + [0]
    segments = {s["segment_id"]: s for s in (await cp_state(cp))["segments"]}
    p3 = segments[body["cp_segment_id"]]
    assert p3["external_id"].startswith("mss-promo-P3-")
    assert p3["member_ids"] == [1, 2, 6, 7, 8]
    assert p3["expires_at"].startswith(
        (dt.date.fromisoformat(TOMORROW) + dt.timedelta(days=1)).isoformat()
    )


async def test_same_promo_twice_and_racing_counts_once(http: aiohttp.ClientSession) -> None:
    await put(http, 1, "X", [1, 2, 3])
    await put(http, 2, "X", [1])
    answers = await asyncio.gather(*(sync(http, 1, "X", "SAME") for _ in range(5)))
    # One call runs the sync; the others either came after it (its answer) or met it
    # running (409 sync_in_progress, to retry).
    ok = [body for status, body in answers if status == 200]
    busy = [body for status, body in answers if status == 409]
    assert ok and len(ok) + len(busy) == 5
    assert all(b["error"]["code"] == "sync_in_progress" for b in busy)
    assert len({tuple(sorted(body.items())) for body in ok}) == 1
    assert (await sync(http, 1, "X", "SAME"))[1] == ok[0]
    assert [await count(http, c) for c in (1, 2, 3)] == [1, 1, 1]
    status, body = await sync(http, 2, "X", "SAME")
    assert status == 409 and body["error"]["code"] == "promo_conflict"


async def test_cp_failure_moves_no_counter_and_retry_counts_once(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await put(http, 1, "X", [1, 2, 3])
    async with cp.post("/_admin/faults", json={"error_rate": 1, "error_status": 503}) as r:
        assert r.status == 200
    status, body = await sync(http, 1, "X", "FAIL")
    assert status == 502 and body["error"]["code"] == "cp_unavailable"
    assert [await count(http, c) for c in (1, 2, 3)] == [0, 0, 0]
    assert await db.fetchval("SELECT state FROM promo_syncs WHERE promo_id = 'FAIL'") == "failed"
    # CP applies the members but the answer is lost: the retry must not double-apply.
    async with cp.post("/_admin/faults", json={"drop_next": 1}) as r:
        assert r.status == 200
    status, body = await sync(http, 1, "X", "FAIL")
    assert status == 200 and body["synced"] == 3
    assert [await count(http, c) for c in (1, 2, 3)] == [1, 1, 1]
    segments = (await cp_state(cp))["segments"]
    assert [(s["segment_id"], s["member_ids"]) for s in segments] == [
        (body["cp_segment_id"], [1, 2, 3])
    ]


async def test_sync_bad_requests(http: aiohttp.ClientSession) -> None:
    await put(http, 1, "EMPTY", [])
    await put(http, 1, "X", [1])
    status, body = await sync(http, 1, "X", "P", end="2001-01-01")
    assert (status, body["error"]["code"]) == (422, "validation_error")
    status, body = await sync(http, 1, "NOPE", "P")
    assert (status, body["error"]["code"]) == (404, "audience_not_found")
    status, body = await sync(http, 1, "EMPTY", "P2")
    assert (status, body["error"]["code"]) == (422, "audience_empty")
    async with http.post("/v1/merchants/1/segments/X/sync", json={"promo_id": "P"}) as r:
        assert r.status == 422


async def test_counts_survive_a_flush_and_expired_promos_stop_counting(
    http: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    await put(http, 1, "X", [1, 2])
    await sync(http, 1, "X", "LIVE")
    await db.execute(
        "INSERT INTO sync_ledger (customer_id, promo_id, end_date)"
        " VALUES (1, 'OLD', current_date - 1)"
    )
    await db.execute("UPDATE sync_customers SET version = version + 1 WHERE customer_id = 1")
    await clean.cache._r.flushall()
    assert [await count(http, c) for c in (1, 2)] == [1, 1]  # from PostgreSQL
    assert await clean.segments.rebuild_cache()
    assert [await count(http, c) for c in (1, 2)] == [1, 1]  # from the rebuilt mirror
    assert await clean.cache.synced_count(1, dt.datetime.now(dt.UTC).timestamp()) == 1
