"""The experiments API end to end: HTTP -> service -> real PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg

from service.bootstrap import Container

SEED_SEGMENTS = ["VOICE_MESSAGES", "PERFORMANCE_VAS", "DISCOUNT_30", "DISCOUNT_50"]


async def create(http: aiohttp.ClientSession, slug: str, **extra: object) -> dict:
    async with http.post("/v1/segments", json={"slug": slug, **extra}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def update(http: aiohttp.ClientSession, uid: int, add=(), remove=()) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    async with http.post(
        f"/v1/users/{uid}/segments", json={"add": list(add), "remove": list(remove)}
    ) as r:
        return r.status, await r.json()


async def segments_of(http: aiohttp.ClientSession, uid: int) -> list[str]:
    async with http.get(f"/v1/users/{uid}/segments") as r:
        assert r.status == 200, await r.text()
        body = await r.json()
        assert body["user_id"] == uid
        return body["segments"]


async def wait_until_complete(container: Container, within_s: float) -> None:
    """Wait for the background rebuild to mark the cache complete (it must, in time)."""
    for _ in range(int(within_s / 0.05)):
        if await container.segments.cache_complete():
            break
        await asyncio.sleep(0.05)
    assert await container.segments.cache_complete()


async def test_seed_example(http: aiohttp.ClientSession) -> None:
    for slug in SEED_SEGMENTS:
        await create(http, slug)
    assert (await update(http, 1000, ["VOICE_MESSAGES", "PERFORMANCE_VAS", "DISCOUNT_30"]))[
        0
    ] == 200
    assert (await update(http, 1002, ["VOICE_MESSAGES", "DISCOUNT_50"]))[0] == 200
    assert await segments_of(http, 1000) == ["DISCOUNT_30", "PERFORMANCE_VAS", "VOICE_MESSAGES"]
    assert await segments_of(http, 1002) == ["DISCOUNT_50", "VOICE_MESSAGES"]
    assert await segments_of(http, 1004) == []


async def test_update_answers_state_after_change(http: aiohttp.ClientSession) -> None:
    await create(http, "A")
    await create(http, "B")
    status, body = await update(http, 7, ["A", "B"])
    assert (status, body) == (200, {"user_id": 7, "segments": ["A", "B"]})
    status, body = await update(http, 7, ["A"], ["B"])
    assert (status, body["segments"]) == (200, ["A"])


async def test_unknown_slug_rejects_whole_request(
    http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await create(http, "A")
    await update(http, 9, ["A"])
    await create(http, "B")
    status, body = await update(http, 9, ["B", "MISSING", "ALSO_MISSING"], ["A"])
    assert status == 404
    assert body["error"]["code"] == "segment_not_found"
    assert body["error"]["details"]["slugs"] == ["ALSO_MISSING", "MISSING"]
    assert await segments_of(http, 9) == ["A"]
    assert await db.fetchval("SELECT count(*) FROM membership_history WHERE user_id = 9") == 1


async def test_slug_in_both_lists_is_rejected(http: aiohttp.ClientSession) -> None:
    await create(http, "A")
    status, body = await update(http, 9, ["A"], ["A"])
    assert status == 422
    assert body["error"]["code"] == "validation_error"
    assert await segments_of(http, 9) == []


async def test_delete_then_recreate_does_not_bring_members_back(
    http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await create(http, "A")
    for uid in (1, 2, 3):
        await update(http, uid, ["A"])
    async with http.delete("/v1/segments/A") as r:
        assert r.status == 204
    assert [await segments_of(http, uid) for uid in (1, 2, 3)] == [[], [], []]
    again = await create(http, "A")
    assert again["slug"] == "A"
    assert [await segments_of(http, uid) for uid in (1, 2, 3)] == [[], [], []]
    # One `remove` per member at deletion.
    removes = await db.fetch(
        "SELECT user_id, cause FROM membership_history WHERE operation = 'remove' ORDER BY user_id"
    )
    assert [(r["user_id"], r["cause"]) for r in removes] == [
        (1, "segment_deleted"),
        (2, "segment_deleted"),
        (3, "segment_deleted"),
    ]
    async with http.delete("/v1/segments/A") as r:
        assert r.status == 204
    async with http.delete("/v1/segments/A") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "segment_not_found"


async def test_segment_crud(http: aiohttp.ClientSession) -> None:
    seg = await create(http, "DISCOUNT_30", description="30% off")
    assert seg["slug"] == "DISCOUNT_30" and seg["description"] == "30% off"
    assert seg["created_at"].endswith("Z")
    async with http.post("/v1/segments", json={"slug": "DISCOUNT_30"}) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "segment_exists"
    async with http.get("/v1/segments/DISCOUNT_30") as r:
        assert (await r.json())["description"] == "30% off"
    async with http.get("/v1/segments/discount_30") as r:
        assert r.status == 404  # slugs are case-sensitive
    async with http.get("/v1/segments") as r:
        assert [s["slug"] for s in (await r.json())["segments"]] == ["DISCOUNT_30"]


async def test_flushed_redis_still_answers_and_rebuilds(
    http: aiohttp.ClientSession, clean: Container
) -> None:
    await create(http, "A")
    await create(http, "B")
    for uid in range(1, 51):
        await update(http, uid, ["A", "B"] if uid % 2 else ["A"])
    await clean.cache._r.flushall()
    answers = await asyncio.gather(*(segments_of(http, uid) for uid in range(1, 51)))
    assert answers == [["A", "B"] if uid % 2 else ["A"] for uid in range(1, 51)]
    await wait_until_complete(clean, within_s=5)
    served_from_store = clean.segments.reads_from_store
    assert await segments_of(http, 3) == ["A", "B"]
    assert clean.segments.reads_from_store == served_from_store


async def test_concurrent_updates_of_one_user_are_serialised(http: aiohttp.ClientSession) -> None:
    slugs = [f"S{i}" for i in range(20)]
    for slug in slugs:
        await create(http, slug)
    results = await asyncio.gather(*(update(http, 77, [s]) for s in slugs))
    assert all(status == 200 for status, _ in results)
    assert await segments_of(http, 77) == sorted(slugs)


async def test_batch_read_one_round_trip_and_fallback(
    http: aiohttp.ClientSession, clean: Container
) -> None:
    await create(http, "A")
    await create(http, "B")
    await update(http, 1, ["A"])
    await update(http, 2, ["A", "B"])
    ids = [1, 2, 3, 2]
    expected = {"1": ["A"], "2": ["A", "B"], "3": []}
    async with http.post("/v1/users/segments:batch", json={"user_ids": ids}) as r:
        assert (r.status, await r.json()) == (200, {"users": expected})
    await clean.cache._r.flushall()
    async with http.post("/v1/users/segments:batch", json={"user_ids": ids}) as r:
        assert (await r.json())["users"] == expected  # answered from PostgreSQL
    async with http.post("/v1/users/segments:batch", json={"user_ids": [0]}) as r:
        assert r.status == 422
    async with http.post("/v1/users/segments:batch", json={"user_ids": list(range(1, 1002))}) as r:
        assert r.status == 422
