"""Kafka ingestion end to end: a real Kafka-protocol broker, consumer, PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.bootstrap import Container
from service.domain.audiences import AudienceChange, AudienceKey, AudienceNotFound
from service.http.schemas import MAX_AUDIENCE_IDS
from service.ingest.consumer import AudienceConsumer
from service.ingest.messages import AudienceMessage, encode


@pytest.fixture
async def topic(clean: Container) -> AsyncIterator[str]:
    yield f"merchant-segments-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def producer(clean: Container) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=clean.settings.kafka_bootstrap, acks="all")
    await p.start()
    yield p
    await p.stop()


Start = Callable[[], Awaitable[AudienceConsumer]]


@pytest.fixture
async def consumer(
    clean: Container, topic: str
) -> AsyncIterator[tuple[Start, Callable[[], Awaitable[None]]]]:
    settings = msgspec.structs.replace(
        clean.settings, kafka_topic=topic, kafka_dlq_topic=f"{topic}.dlq", kafka_group=topic
    )
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start() -> AudienceConsumer:
        c = AudienceConsumer(settings, clean.audiences, MAX_AUDIENCE_IDS)
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(c.run(stop))))
        return c

    async def stop() -> None:
        while running:
            event, task = running.pop()
            event.set()
            await asyncio.wait_for(task, 15)

    yield start, stop
    await stop()


async def send(producer: AIOKafkaProducer, topic: str, **fields: object) -> None:
    fields.setdefault("batch_id", uuid.uuid4().hex)
    key, value = encode(AudienceMessage(**fields))  # type: ignore[arg-type]
    await producer.send_and_wait(topic, value=value, key=key)


async def audience(http: aiohttp.ClientSession, m: int, t: str) -> dict | None:
    async with http.get(f"/v1/merchants/{m}/segments/{t}") as r:
        return await r.json() if r.status == 200 else None


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_replace_then_deltas_become_visible(
    http: aiohttp.ClientSession, producer: AIOKafkaProducer, consumer, topic: str
) -> None:  # type: ignore[no-untyped-def]
    start, _ = consumer
    await send(
        producer, topic, merchant_id=5, segment_type="VIP", op="replace", customer_ids=[1, 2, 3]
    )
    await send(producer, topic, merchant_id=5, segment_type="VIP", op="add", customer_ids=[4])
    await send(producer, topic, merchant_id=5, segment_type="VIP", op="remove", customer_ids=[1])
    await start()

    async def done() -> bool:
        a = await audience(http, 5, "VIP")
        return a is not None and a["version"] == 3

    await eventually(done)
    assert (await audience(http, 5, "VIP"))["customers"] == 3


async def test_multi_part_snapshot_is_all_or_nothing(
    http: aiohttp.ClientSession,
    producer: AIOKafkaProducer,
    consumer,
    topic: str,
    db: asyncpg.Connection,
) -> None:  # type: ignore[no-untyped-def]
    start, _ = consumer
    await send(producer, topic, merchant_id=5, segment_type="S", op="replace", customer_ids=[9])
    c = await start()
    await eventually(lambda: _has_version(http, 5, "S", 1))
    parts = [list(range(1 + i * 100, 101 + i * 100)) for i in range(3)]
    for i in (0, 1):
        await send(
            producer,
            topic,
            merchant_id=5,
            segment_type="S",
            op="replace",
            customer_ids=parts[i],
            batch_id="snap",
            part=i + 1,
            parts=3,
        )

    async def staged() -> bool:
        return await db.fetchval("SELECT count(*) FROM snapshot_parts") == 2

    await eventually(staged)
    # Two of three parts are in: the old list is still the one readers see.
    assert (await audience(http, 5, "S"))["customers"] == 1
    await send(
        producer,
        topic,
        merchant_id=5,
        segment_type="S",
        op="replace",
        customer_ids=parts[2],
        batch_id="snap",
        part=3,
        parts=3,
    )
    await eventually(lambda: _has_version(http, 5, "S", 2))
    assert (await audience(http, 5, "S"))["customers"] == 300
    assert await db.fetchval("SELECT count(*) FROM snapshot_parts") == 0
    assert c.dead_lettered == 0


async def _has_version(http: aiohttp.ClientSession, m: int, t: str, v: int) -> bool:
    a = await audience(http, m, t)
    return a is not None and a["version"] == v


async def test_poison_message_goes_to_dlq_and_partition_moves_on(
    http: aiohttp.ClientSession, producer: AIOKafkaProducer, consumer, topic: str, clean: Container
) -> None:  # type: ignore[no-untyped-def]
    start, _ = consumer
    key = b"5:P"
    await producer.send_and_wait(topic, value=b"{not json", key=key)
    await producer.send_and_wait(
        topic,
        key=key,
        value=b'{"merchant_id": 5, "segment_type": "P", "op": "replace",'
        b' "customer_ids": [0], "batch_id": "b"}',
    )
    await send(producer, topic, merchant_id=5, segment_type="P", op="replace", customer_ids=[7])
    c = await start()
    await eventually(lambda: _has_version(http, 5, "P", 1))
    assert c.dead_lettered == 2
    dlq = AIOKafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=clean.settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"{topic}-reader",
    )
    await dlq.start()
    try:
        got = []
        async with asyncio.timeout(15):
            while len(got) < 2:
                for msgs in (await dlq.getmany(timeout_ms=500)).values():
                    got.extend(msgs)
    finally:
        await dlq.stop()
    reasons = sorted(dict(m.headers)["reason"].decode() for m in got)
    assert reasons[0].startswith("customer_ids: customer ids are integers")
    assert reasons[1].startswith("undecodable")


async def test_redelivered_batch_changes_nothing(clean: Container, db: asyncpg.Connection) -> None:
    key = AudienceKey(8, "R")
    change = [(0, AudienceChange(key, "add", add=[1])), (1, AudienceChange(key, "add", add=[2]))]
    assert await clean.audiences.apply_kafka("t", 0, change) == 2
    # The same batch again, and again with one new message: only the new one applies.
    assert await clean.audiences.apply_kafka("t", 0, change) == 0
    more = [*change, (2, AudienceChange(key, "remove", remove=[1]))]
    assert await clean.audiences.apply_kafka("t", 0, more) == 1
    info = await clean.audiences.get(key)
    assert (info.customers, info.version) == (1, 3)
    assert await clean.audiences.next_offsets("t") == {0: 3}
    assert await db.fetchval("SELECT count(*) FROM audience_history") == 3


async def test_restarted_consumer_neither_loses_nor_repeats(
    http: aiohttp.ClientSession,
    producer: AIOKafkaProducer,
    consumer,
    topic: str,
    db: asyncpg.Connection,
) -> None:  # type: ignore[no-untyped-def]
    start, stop = consumer
    for i in range(1, 6):
        await send(producer, topic, merchant_id=6, segment_type="A", op="add", customer_ids=[i])
    await start()
    await eventually(lambda: _has_version(http, 6, "A", 5))
    await stop()
    # Forget Kafka's committed offsets: the positions PostgreSQL holds must win.
    for i in range(6, 11):
        await send(producer, topic, merchant_id=6, segment_type="A", op="add", customer_ids=[i])
    await start()
    await eventually(lambda: _has_version(http, 6, "A", 10))
    await asyncio.sleep(1)
    info = await audience(http, 6, "A")
    assert (info["customers"], info["version"]) == (10, 10)
    assert await db.fetchval("SELECT count(*) FROM audience_history") == 10


async def test_incomplete_snapshot_is_discarded_and_reported(clean: Container) -> None:
    key = AudienceKey(8, "INC")
    part = AudienceChange(key, "replace", add=[1], batch_id="b", part=1, parts=2, source="kafka")
    assert await clean.audiences.apply_kafka("t2", 0, [(0, part)]) == 1
    stale = await clean.audiences.discard_stale_snapshots(0)
    assert [(s.key, s.batch_id, s.received, s.parts) for s in stale] == [(key, "b", 1, 2)]
    # The audience never became visible.
    with pytest.raises(AudienceNotFound):
        await clean.audiences.get(key)
