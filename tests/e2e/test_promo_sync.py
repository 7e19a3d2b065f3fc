"""Promo sync: what MPS is told is what holds, under concurrency, CP faults and crashes.

Real PostgreSQL, Valkey and the CP emulator (a real HTTP server); the threshold is 2 in
the test settings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.bootstrap import Container
from service.domain.promos import end_of_day
from service.settings import Settings
from tests.conftest import scrape, serve_process

BASE = "/internal/v1/merchants/{m}/segments/{t}/customers"
TODAY = dt.datetime.now(dt.UTC).date()
END = (TODAY + dt.timedelta(days=1)).isoformat()
T = 2  # SEGMENTS_SYNC_THRESHOLD in the test settings


async def put(http: aiohttp.ClientSession, m: int, t: str, ids: list[int]) -> None:
    async with http.put(BASE.format(m=m, t=t), json={"customer_ids": ids}) as r:
        assert r.status == 200, await r.text()


async def sync(
    http: aiohttp.ClientSession, m: int, t: str, promo: str, end: str = END
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"/v1/merchants/{m}/segments/{t}/sync", json={"promo_id": promo, "end_date": end}
    ) as r:
        return r.status, await r.json()


async def count(http: aiohttp.ClientSession, cid: int) -> int:
    async with http.get(f"/v1/customers/{cid}/sync-count") as r:
        assert r.status == 200
        return int((await r.json())["active_synced_segments"])


async def promo(http: aiohttp.ClientSession, promo_id: str) -> dict[str, Any]:
    async with http.get(f"/v1/promos/{promo_id}") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def cp_segments(cp: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    """CP's segments by segment id."""
    async with cp.get("/_admin/state") as r:
        return {s["segment_id"]: s for s in (await r.json())["segments"]}


async def cp_faults(cp: aiohttp.ClientSession, **faults: Any) -> None:
    async with cp.post("/_admin/faults", json=faults) as r:
        assert r.status == 200, await r.text()


async def ledger(db: asyncpg.Connection, promo_id: str) -> list[int]:
    rows = await db.fetch(
        "SELECT customer_id FROM sync_ledger WHERE promo_id = $1 ORDER BY 1", promo_id
    )
    return [r[0] for r in rows]


# -- the threshold under concurrency --------------------------------------------------


async def test_ten_concurrent_promos_over_one_customer_count_it_exactly_t_times(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    for m in range(1, 11):
        await put(http, m, "A", [42, 100 + m])
    await cp_faults(cp, latency_ms=50)  # keep the attempts in flight together
    answers = await asyncio.gather(*(sync(http, m, "A", f"P{m}") for m in range(1, 11)))
    assert {status for status, _ in answers} == {200}
    with_42 = [
        body
        for _, body in answers
        if 42 in (await cp_segments(cp))[body["cp_segment_id"]]["member_ids"]
    ]
    assert len(with_42) == T
    assert sum(body["skipped_over_threshold"] for _, body in answers) == 10 - T
    assert await count(http, 42) == T
    assert await db.fetchval("SELECT count(*) FROM sync_ledger WHERE customer_id = 42") == T


async def test_the_threshold_holds_across_two_api_processes(
    settings: Settings, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    for m in range(1, 13):
        await put(http, m, "A", [7, 8, 9])
    env = {"SEGMENTS_CP_URL": settings.cp_url, "SEGMENTS_SYNC_THRESHOLD": str(T)}
    await cp_faults(cp, latency_ms=30)
    with (
        serve_process(settings, env=env) as (_, port1),
        serve_process(settings, env=env) as (
            _,
            port2,
        ),
    ):
        async with aiohttp.ClientSession() as s:

            async def call(m: int) -> int:
                port = port1 if m % 2 else port2
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/merchants/{m}/segments/A/sync",
                    json={"promo_id": f"Q{m}", "end_date": END},
                ) as r:
                    assert r.status == 200, await r.text()
                    return int((await r.json())["synced"])

            synced = await asyncio.gather(*(call(m) for m in range(1, 13)))
    assert sum(synced) == 3 * T
    assert [await count(http, c) for c in (7, 8, 9)] == [T, T, T]
    members = [s["member_ids"] for s in (await cp_segments(cp)).values()]
    assert sorted(c for ids in members for c in ids) == [7] * T + [8] * T + [9] * T


# -- an error answer means nothing is in force ------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(503, "cp_unavailable"), (400, "cp_rejected")])
async def test_cp_failing_leaves_nothing_in_force_and_the_reconciler_never_completes_it(
    http: aiohttp.ClientSession,
    cp: aiohttp.ClientSession,
    clean: Container,
    db: asyncpg.Connection,
    status: int,
    code: str,
) -> None:
    await put(http, 1, "X", [1, 2, 3])
    await cp_faults(cp, error_status=status, error_rate=1)
    got, body = await sync(http, 1, "X", "DOWN")
    assert (got, body["error"]["code"]) == (502, code)
    for _ in range(3):
        await clean.reconciler.promo_round()
    await cp_faults(cp)  # CP is back: still nothing completes the failed sync
    for _ in range(3):
        await clean.reconciler.promo_round()
    state = await promo(http, "DOWN")
    assert (state["state"], state["synced"], state["cp_segment_id"]) == ("failed", 0, None)
    assert state["attempts"] == 1 and state["last_error"]
    assert [await count(http, c) for c in (1, 2, 3)] == [0, 0, 0]
    assert await ledger(db, "DOWN") == []
    assert [s for s in (await cp_segments(cp)).values() if s["member_ids"]] == []


async def test_a_failed_update_takes_the_promo_out_of_force(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    await put(http, 1, "X", [1, 2, 3])
    got, first = await sync(http, 1, "X", "U")
    assert got == 200
    await put(http, 1, "X", [1, 2])
    # The update's removal fails, and so does the undo's delete (CP refuses everything).
    await cp_faults(cp, error_status=400, error_rate=1)
    got, body = await sync(http, 1, "X", "U")
    assert (got, body["error"]["code"]) == (502, "cp_rejected")
    state = await promo(http, "U")
    assert (state["state"], state["synced"]) == ("failed", 0)
    assert [await count(http, c) for c in (1, 2, 3)] == [0, 0, 0]
    assert first["cp_segment_id"] in await cp_segments(cp)
    assert await db.fetchval("SELECT count(*) FROM cp_cleanup") == 1
    # CP is back: the reconciler deletes the segment; nothing is completed.
    await cp_faults(cp)
    await clean.reconciler.promo_round()
    assert await cp_segments(cp) == {}
    assert await db.fetchval("SELECT count(*) FROM cp_cleanup") == 0
    assert (await promo(http, "U"))["state"] == "failed"


async def test_an_api_process_killed_mid_sync_is_undone_after_its_lease(
    settings: Settings,
    http: aiohttp.ClientSession,
    cp: aiohttp.ClientSession,
    clean: Container,
    db: asyncpg.Connection,
) -> None:
    await put(http, 1, "K", [1, 2, 3])
    env = {
        "SEGMENTS_CP_URL": settings.cp_url,
        "SEGMENTS_SYNC_THRESHOLD": str(T),
        "SEGMENTS_SYNC_DEADLINE_S": "1",
        "SEGMENTS_CP_TIMEOUT_S": "5",
    }
    await cp_faults(cp, latency_ms=600)
    with serve_process(settings, env=env) as (proc, port):
        async with aiohttp.ClientSession() as s:
            call = asyncio.ensure_future(
                s.post(
                    f"http://127.0.0.1:{port}/v1/merchants/1/segments/K/sync",
                    json={"promo_id": "KILLED", "end_date": END},
                )
            )
            # Until the attempt holds its slots (reserved, not yet counted) ...
            deadline = time.monotonic() + 10
            while await db.fetchval("SELECT count(*) FROM sync_ledger") < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # ... then the process dies mid-CP-call.
            proc.wait()
            with pytest.raises(aiohttp.ClientError):
                await call
    await cp_faults(cp)
    assert (await promo(http, "KILLED"))["state"] == "in_progress"
    assert [await count(http, c) for c in (1, 2, 3)] == [0, 0, 0]  # reserved, not counted
    # The lease (deadline 1 s + undo budget 2 s + 0.5 s) passes; then one round undoes it.
    lease_left = await db.fetchval(
        "SELECT extract(epoch FROM lease_until - now()) FROM promo_syncs"
    )
    await asyncio.sleep(float(lease_left) + 0.7)
    await clean.reconciler.promo_round()
    state = await promo(http, "KILLED")
    assert state["state"] == "failed" and "abandoned" in state["last_error"]
    assert await ledger(db, "KILLED") == []
    assert await db.fetchval("SELECT count(*) FROM cp_cleanup") == 0
    assert [s for s in (await cp_segments(cp)).values() if s["member_ids"]] == []
    # MPS retries: a new attempt succeeds, counted once.
    got, body = await sync(http, 1, "K", "KILLED")
    assert (got, body["synced"]) == (200, 3)
    assert [await count(http, c) for c in (1, 2, 3)] == [1, 1, 1]


# -- update and cancel --------------------------------------------------------------------


async def test_resync_brings_cp_up_to_date_and_cancel_releases_everything(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    await put(http, 1, "X", [1, 2, 3, 4])
    await put(http, 2, "Y", [4])
    await put(http, 3, "Y", [4])
    assert (await sync(http, 2, "Y", "O1"))[0] == 200
    assert (await sync(http, 3, "Y", "O2"))[0] == 200  # customer 4 is now at T
    got, first = await sync(http, 1, "X", "UP")
    assert (got, first["synced"], first["skipped_over_threshold"]) == (200, 3, 1)
    segment_id = first["cp_segment_id"]
    calls_before = (await (await cp.get("/_admin/state")).json())["calls"]["received"]
    # Unchanged audience and date: the same answer, no CP call.
    assert await sync(http, 1, "X", "UP") == (200, first)
    assert (await (await cp.get("/_admin/state")).json())["calls"]["received"] == calls_before

    # 1 and 2 leave, 5 enters, 4 is still over the threshold until O2 is cancelled.
    await put(http, 1, "X", [3, 4, 5])
    got, second = await sync(http, 1, "X", "UP")
    assert (got, second["synced"], second["skipped_over_threshold"]) == (200, 2, 1)
    assert second["cp_segment_id"] == segment_id
    assert (await cp_segments(cp))[segment_id]["member_ids"] == [3, 5]
    assert [await count(http, c) for c in (1, 2, 3, 4, 5)] == [0, 0, 1, 2, 1]

    async with http.delete("/v1/promos/O2") as r:
        assert r.status == 204
    later = (TODAY + dt.timedelta(days=20)).isoformat()
    got, third = await sync(http, 1, "X", "UP", end=later)
    assert (got, third["synced"], third["skipped_over_threshold"]) == (200, 3, 0)
    segment = (await cp_segments(cp))[segment_id]
    assert segment["member_ids"] == [3, 4, 5]
    assert segment["expires_at"].startswith((TODAY + dt.timedelta(days=21)).isoformat())
    ends = await db.fetch("SELECT DISTINCT end_date FROM sync_ledger WHERE promo_id = 'UP'")
    assert [r[0].isoformat() for r in ends] == [later]
    # The Redis mirror carries the new end too.
    until = await clean.cache._r.zscore("seg:{3}:c:3", "UP")
    assert until == end_of_day(dt.date.fromisoformat(later)).timestamp()

    async with http.delete("/v1/promos/UP") as r:
        assert r.status == 204
    async with http.delete("/v1/promos/UP") as r:
        assert r.status == 204  # idempotent
    assert segment_id not in await cp_segments(cp)
    assert [await count(http, c) for c in (3, 4, 5)] == [0, 1, 0]
    state = await promo(http, "UP")
    assert state["state"] == "cancelled"
    got, body = await sync(http, 1, "X", "UP", end=later)
    assert (got, body["error"]["code"]) == (409, "promo_cancelled")
    async with http.delete("/v1/promos/NOPE") as r:
        assert (r.status, (await r.json())["error"]["code"]) == (404, "promo_not_found")
    async with http.get("/v1/promos/NOPE") as r:
        assert r.status == 404


async def test_nobody_under_the_threshold_creates_nothing_in_cp(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    await put(http, 1, "X", [1])
    assert (await sync(http, 1, "X", "A1"))[0] == 200
    assert (await sync(http, 1, "X", "A2"))[0] == 200
    before = set(await cp_segments(cp))
    got, body = await sync(http, 1, "X", "A3")
    assert got == 200
    assert (body["synced"], body["skipped_over_threshold"], body["cp_segment_id"]) == (0, 1, None)
    assert set(await cp_segments(cp)) == before
    assert (await promo(http, "A3"))["state"] == "synced"


async def test_end_date_limits(cp: aiohttp.ClientSession, http: aiohttp.ClientSession) -> None:
    await put(http, 1, "X", [1])
    for end in ("9999-12-31", (TODAY + dt.timedelta(days=367)).isoformat(), "2001-01-01"):
        got, body = await sync(http, 1, "X", "E", end=end)
        assert (got, body["error"]["code"]) == (422, "validation_error"), end
    got, _ = await sync(http, 1, "X", "E", end=(TODAY + dt.timedelta(days=366)).isoformat())
    assert got == 200


# -- many callers, a slow CP -----------------------------------------------------------------


async def test_fifty_calls_against_a_slow_cp_get_definite_answers_without_draining_the_pool(
    settings: Settings, http: aiohttp.ClientSession, cp: aiohttp.ClientSession
) -> None:
    for m in range(1, 31):
        await put(http, m, "S", [m, 1000 + m])
    await cp_faults(cp, latency_ms=2000)
    env = {
        "SEGMENTS_CP_URL": settings.cp_url,
        "SEGMENTS_DB_POOL_MAX": "5",
        "SEGMENTS_CP_RATE_LIMIT_PER_S": "1000",
    }
    with serve_process(settings, env=env) as (_, port):
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:

            async def call(i: int) -> tuple[int, str, float]:
                m = i % 30 + 1  # 30 promos, 20 of them called twice at once
                started = time.monotonic()
                async with s.post(
                    f"{base}/v1/merchants/{m}/segments/S/sync",
                    json={"promo_id": f"SLOW{m}", "end_date": END},
                ) as r:
                    body = await r.json()
                    code = body["error"]["code"] if r.status >= 400 else ""
                    return r.status, code, time.monotonic() - started

            calls = asyncio.gather(*(call(i) for i in range(50)))
            # Every attempt is claimed and waiting on CP: none holds a connection.
            await asyncio.sleep(1.2)
            during = await asyncio.to_thread(scrape, f"{base}/metrics")
            answers = await calls
            metrics = await asyncio.to_thread(scrape, f"{base}/metrics")
    statuses = {(status, code) for status, code, _ in answers}
    assert statuses <= {(200, ""), (409, "sync_in_progress")}, statuses
    assert sum(1 for status, _, _ in answers if status == 200) >= 30
    assert max(took for _, _, took in answers) < 10 + 2  # the deadline, and some slack
    assert during["segments_db_pool_in_use"][0][1] == 0
    # A pool of 5 served 50 callers without turning one away.
    assert metrics["segments_db_pool_acquire_timeouts_total"][0][1] == 0
    assert 1 <= metrics["segments_db_pool_in_use_peak"][0][1] <= 5


# -- the count mirror -------------------------------------------------------------------------


async def test_counts_are_repaired_after_a_redis_write_pause(
    cp: aiohttp.ClientSession, http: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    ids = list(range(1, 11))
    await put(http, 1, "X", ids)
    await clean.cache._r.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
    got, body = await sync(http, 1, "X", "PAUSED")
    assert (got, body["synced"]) == (200, 10)
    assert await db.fetchval("SELECT count(*) FROM counter_outbox") == 10
    await asyncio.sleep(1.6)
    await clean.reconciler.promo_round()  # one round
    now = time.time()
    assert [await clean.cache.synced_count(c, now) for c in ids] == [1] * 10
    assert [await count(http, c) for c in ids] == [1] * 10
    assert await db.fetchval("SELECT count(*) FROM counter_outbox") == 0


async def test_counts_survive_a_flush_then_the_scan_repairs_a_lost_key(
    cp: aiohttp.ClientSession, http: aiohttp.ClientSession, clean: Container
) -> None:
    await put(http, 1, "X", [1, 2])
    await put(http, 2, "X", [2])
    assert (await sync(http, 1, "X", "F1"))[0] == 200
    assert (await sync(http, 2, "X", "F2"))[0] == 200
    await clean.cache._r.flushall()
    assert [await count(http, c) for c in (1, 2, 3)] == [1, 2, 0]  # from PostgreSQL
    assert await clean.segments.rebuild_cache()
    now = time.time()
    assert [await clean.cache.synced_count(c, now) for c in (1, 2)] == [1, 2]
    # A key lost without a flush (a failover to a stale replica): the scan finds it.
    await clean.cache._r.delete("seg:{2}:c:2")
    assert await clean.cache.synced_count(2, now) == 0
    assert await clean.promos.scan_counts() == 1
    assert await clean.cache.synced_count(2, now) == 2


async def test_one_promo_failing_to_undo_does_not_stop_the_others(
    cp: aiohttp.ClientSession, http: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    await put(http, 1, "X", [1])
    await put(http, 2, "X", [2])
    for m, p in ((1, "BAD"), (2, "GOOD")):
        assert (await sync(http, m, "X", p))[0] == 200
    # Two attempts whose process died: leases already passed.
    await db.execute(
        "UPDATE promo_syncs SET state = 'in_progress', attempt_token = promo_id,"
        " lease_until = now() - interval '1 second'"
    )
    store = clean.promos._store
    real_fail = store.fail

    async def fail(promo_id: str, *args: Any) -> Any:
        if promo_id == "BAD":
            raise RuntimeError("this promo's undo breaks")
        return await real_fail(promo_id, *args)

    store.fail = fail  # type: ignore[method-assign]
    try:
        errors_before = clean.promos.errors["abandon"]
        await clean.reconciler.promo_round()
    finally:
        del store.fail  # type: ignore[method-assign]
    assert clean.promos.errors["abandon"] == errors_before + 1
    assert (await promo(http, "GOOD"))["state"] == "failed"
    assert (await promo(http, "BAD"))["state"] == "in_progress"
    await clean.reconciler.promo_round()  # the next round handles it
    assert (await promo(http, "BAD"))["state"] == "failed"
