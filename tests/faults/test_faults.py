"""Fault injection: real servers on loopback, a concurrent load, one fault each.

Every scenario checks afterwards against PostgreSQL and against the record of what
the clients were told (tests/faults/load.py).  Bounded in time; nothing leaves the
machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time

import aiohttp
import asyncpg
import pytest

from devstack import EmbeddedStack
from service.bootstrap import Container
from service.domain import rules
from service.domain.model import AddItem
from tests.faults.load import SLUGS, Record, run_load

USERS = 60


@pytest.fixture
async def seeded(http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    for slug in SLUGS:
        async with http.post("/v1/segments", json={"slug": slug}) as r:
            assert r.status == 201
    return http


async def converge(container: Container, within_s: float = 30) -> None:
    """Let the reconciler do its work until the copy is complete and drained."""
    deadline = time.monotonic() + within_s
    while not await container.segments.cache_complete():
        assert time.monotonic() < deadline, "cache was not rebuilt in time"
        await container.reconciler.step()
        await asyncio.sleep(0.1)
    await container.reconciler.drain_outbox(min_age_s=0)


async def check_against_truth(
    container: Container, http: aiohttp.ClientSession, rec: Record
) -> None:
    await converge(container)
    registry = await container.store.registry()
    now = time.time()
    for uid in range(1, USERS + 1):
        state = await container.store.user_state(uid)
        live = [m.segment_id for m in state.memberships if m.expires_at > now]
        truth = rules.visible_slugs(registry, uid, live, state.excluded)
        if uid not in rec.unknown:
            assert truth == rec.segments.get(uid, []), f"user {uid}: acknowledged write lost"
        async with http.get(f"/v1/users/{uid}/segments") as r:
            assert (await r.json())["segments"] == truth, f"user {uid}: read differs from truth"
    scan = await container.reconciler.scan(recheck_after_s=0)
    assert scan.found == 0, "Redis disagrees with PostgreSQL after convergence"


async def test_flushall_mid_load(seeded: aiohttp.ClientSession, clean: Container) -> None:
    async def fault() -> None:
        await clean.cache._r.flushall()

    rec, stats = await run_load(seeded, users=USERS, seconds=4, fault_at=1.5, fault=fault)
    print(stats.summary("redis FLUSHALL"))
    assert stats.reads > 200 and stats.acked > 50
    assert stats.wrong == []
    assert stats.read_errors == 0
    await check_against_truth(clean, seeded, rec)


async def test_redis_killed_and_restarted_mid_load(
    seeded: aiohttp.ClientSession, clean: Container, stack: EmbeddedStack
) -> None:
    async def fault() -> None:
        stack.valkey.kill()
        await asyncio.sleep(1)
        await asyncio.to_thread(stack.valkey.start)

    rec, stats = await run_load(seeded, users=USERS, seconds=5, fault_at=1.5, fault=fault)
    print(stats.summary("redis SIGKILL + restart"))
    assert stats.acked > 50
    assert stats.wrong == []
    assert stats.read_errors == 0
    await check_against_truth(clean, seeded, rec)


async def test_redis_paused_reads_answer_from_postgres_in_time(
    seeded: aiohttp.ClientSession, clean: Container, stack: EmbeddedStack
) -> None:
    async def fault() -> None:
        stack.valkey.pause()
        try:
            await asyncio.sleep(5)
        finally:
            stack.valkey.resume()

    rec, stats = await run_load(seeded, users=USERS, seconds=7, fault_at=1, fault=fault)
    print(stats.summary("redis SIGSTOP 5 s"))
    assert stats.read_errors == 0
    # The Redis timeout is 250 ms; nothing may hang on the paused server.
    assert stats.max_read_s < 1.5, stats.max_read_s
    assert stats.wrong == []
    assert stats.write_statuses.get(200, 0) == stats.acked > 50
    await check_against_truth(clean, seeded, rec)


async def test_postgres_stopped_mid_load(
    seeded: aiohttp.ClientSession, clean: Container, stack: EmbeddedStack
) -> None:
    async def fault() -> None:
        await asyncio.to_thread(stack.postgres.stop)
        await asyncio.sleep(2)
        await asyncio.to_thread(stack.postgres.start)

    rec, stats = await run_load(seeded, users=USERS, seconds=6, fault_at=1.5, fault=fault)
    print(stats.summary("postgres stopped 2 s"))
    # While PostgreSQL was down, writes were refused with 503 (nothing changed) and
    # reads kept being answered from Redis.
    assert stats.write_statuses.get(503, 0) > 0
    assert set(stats.write_statuses) <= {200, 503}
    assert stats.wrong == []
    await check_against_truth(clean, seeded, rec)


async def _commit_without_cache_write(container: Container, uid: int, slug: str) -> None:
    """What an API process leaves behind when it dies right after its commit: the change
    (and its outbox row) in PostgreSQL, nothing in Redis."""
    change = rules.validate_change(uid, [AddItem(slug)], [], max_items=10)
    await container.store.apply_change(change, [None])


async def test_crash_between_commit_and_cache_write(
    seeded: aiohttp.ClientSession, clean: Container
) -> None:
    for uid in range(1, 21):
        await _commit_without_cache_write(clean, uid, "F1")
    # The version scan finds the 20 users behind and repairs them...
    assert (await clean.reconciler.scan(recheck_after_s=0)).found == 20
    # ...after which the divergence is back to 0.
    assert (await clean.reconciler.scan(recheck_after_s=0)).found == 0
    # The outbox drain repairs the same kind of loss without a full scan.
    for uid in range(21, 31):
        await _commit_without_cache_write(clean, uid, "F2")
    assert await clean.reconciler.drain_outbox(min_age_s=0) >= 10
    assert (await clean.reconciler.scan(recheck_after_s=0)).found == 0
    async with seeded.get("/v1/users/25/segments") as r:
        assert (await r.json())["segments"] == ["F2"]
    freshness = await clean.cache.freshness()
    assert freshness["divergence_found"] >= 20
    assert time.time() - freshness["synchronized_on"] < 30


async def test_consumer_killed_mid_batch_applies_everything_once(
    clean: Container, stack: EmbeddedStack, db: asyncpg.Connection, tmp_path: object
) -> None:
    from aiokafka import AIOKafkaProducer

    from service.ingest.messages import AudienceMessage, encode

    topic = f"faults-{os.getpid()}-{time.monotonic_ns()}"
    env = {
        **os.environ,
        **stack.env(),
        "SEGMENTS_KAFKA_TOPIC": topic,
        "SEGMENTS_KAFKA_GROUP": topic,
        "SEGMENTS_KAFKA_MAX_BATCH": "20",
    }
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.url, acks="all")
    await producer.start()
    total = 400
    try:
        for i in range(1, total + 1):
            key, value = encode(
                AudienceMessage(
                    merchant_id=77, segment_type="K", op="add", customer_ids=[i], batch_id=str(i)
                )
            )
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "consume"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def applied() -> int:
        return int(
            await db.fetchval(
                "SELECT coalesce(max(version), 0) FROM audiences WHERE merchant_id = 77"
            )
        )

    first = start()
    try:
        deadline = time.monotonic() + 60
        while await applied() < 60:
            assert time.monotonic() < deadline, "consumer made no progress"
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # mid-stream, possibly mid-batch
        first.wait(10)
        killed_at = await applied()
        assert killed_at < total
        second = start()
        try:
            deadline = time.monotonic() + 90
            while await applied() < total:
                assert time.monotonic() < deadline, "restarted consumer did not finish"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # any duplicate would land now
        finally:
            second.terminate()
            second.wait(15)
    finally:
        if first.poll() is None:
            first.kill()
    members = await db.fetchval(
        "SELECT count(*) FROM audience_members m JOIN audiences a USING (generation)"
        " WHERE a.merchant_id = 77"
    )
    history = await db.fetchval("SELECT count(*) FROM audience_history WHERE merchant_id = 77")
    assert (members, history, await applied()) == (total, total, total)


async def test_cp_timeouts_and_lost_answers_never_double_count(
    http: aiohttp.ClientSession, cp: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    url = "/internal/v1/merchants/3/segments/T/customers"
    async with http.put(url, json={"customer_ids": list(range(1, 51))}) as r:
        assert r.status == 200
    end = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=30)
    body = {"promo_id": "SLOW", "end_date": end.isoformat()}
    # CP answers after the client's timeout (0.5 s in the tests) but still applies each
    # call: every attempt times out, and some of them were applied.
    async with cp.post("/_admin/faults", json={"latency_ms": 800}) as r:
        assert r.status == 200
    async with http.post("/v1/merchants/3/segments/T/sync", json=body) as r:
        assert r.status == 502
        assert (await r.json())["error"]["code"] == "cp_unavailable"
    assert await db.fetchval("SELECT count(*) FROM sync_ledger") == 0
    # CP recovers.  The reconciler undoes what is left of the failed attempt, and never
    # completes it: MPS was told it failed.
    async with cp.post("/_admin/faults", json={}) as r:
        assert r.status == 200
    await asyncio.sleep(1)  # the timed-out calls CP still applies land meanwhile
    await clean.reconciler.promo_round()
    assert await db.fetchval("SELECT state FROM promo_syncs WHERE promo_id = 'SLOW'") == "failed"
    assert await db.fetchval("SELECT count(*) FROM sync_ledger") == 0
    async with cp.get("/_admin/state") as r:
        assert [s for s in (await r.json())["segments"] if s["members"]] == []
    # MPS retries: a new attempt, counted once.
    async with http.post("/v1/merchants/3/segments/T/sync", json=body) as r:
        answer = await r.json()
        assert (r.status, answer["synced"]) == (200, 50)
    async with cp.get("/_admin/state") as r:
        live = [s for s in (await r.json())["segments"] if s["members"]]
    assert [(s["segment_id"], s["members"]) for s in live] == [(answer["cp_segment_id"], 50)]
    assert await db.fetchval("SELECT count(*) FROM sync_ledger") == 50
    async with http.get("/v1/customers/7/sync-count") as r:
        assert (await r.json())["active_synced_segments"] == 1
