"""Kafka ingestion end to end: a real Kafka-protocol broker, consumer, PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from persistence.audiences import PgAudienceStore
from service.bootstrap import Container
from service.domain.audiences import (
    AudienceChange,
    AudienceKey,
    AudienceNotFound,
    AudienceService,
    StaleSnapshot,
)
from service.domain.errors import StorageUnavailable
from service.http.schemas import MAX_AUDIENCE_IDS
from service.ingest.consumer import AudienceConsumer
from service.ingest.messages import AudienceMessage, encode
from service.settings import Settings


@pytest.fixture
async def topic(clean: Container) -> AsyncIterator[str]:
    yield f"merchant-segments-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def producer(clean: Container) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=clean.settings.kafka_bootstrap, acks="all")
    await p.start()
    yield p
    await p.stop()


Start = Callable[..., Awaitable[AudienceConsumer]]


@pytest.fixture
async def consumer(
    clean: Container, topic: str
) -> AsyncIterator[tuple[Start, Callable[[], Awaitable[None]]]]:
    base = msgspec.structs.replace(
        clean.settings, kafka_topic=topic, kafka_dlq_topic=f"{topic}.dlq", kafka_group=topic
    )
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(
        audiences: AudienceService | None = None, *, settings: Settings | None = None, **kw: Any
    ) -> AudienceConsumer:
        """A consumer on the test's topic: of ``audiences`` (the container's by
        default), with ``settings`` (the test's), and AudienceConsumer's keywords."""
        c = AudienceConsumer(settings or base, audiences or clean.audiences, MAX_AUDIENCE_IDS, **kw)
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


# -- every message gets a verdict (poison messages never block a partition) ----------


async def _read_dlq(clean: Container, topic: str, n: int) -> list[ConsumerRecord[bytes, bytes]]:
    dlq = AIOKafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=clean.settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"{topic}-reader",
        max_partition_fetch_bytes=16 << 20,
        fetch_max_bytes=32 << 20,
    )
    await dlq.start()
    try:
        got: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(20):
            while len(got) < n:
                for msgs in (await dlq.getmany(timeout_ms=500)).values():
                    got.extend(msgs)
    finally:
        await dlq.stop()
    return sorted(got, key=lambda m: int(dict(m.headers)["source-offset"]))


async def test_any_poison_message_is_dead_lettered_and_the_partition_moves_on(
    http: aiohttp.ClientSession, consumer, topic: str, clean: Container
) -> None:  # type: ignore[no-untyped-def]
    start, _ = consumer
    big = AIOKafkaProducer(
        bootstrap_servers=clean.settings.kafka_bootstrap, acks="all", max_request_size=8 << 20
    )
    await big.start()
    try:
        await send(big, topic, merchant_id=990, segment_type="P", op="replace", customer_ids=[1, 2])
        head = b'{"merchant_id":990,"segment_type":"P",'
        poison = [
            # orjson could not write this id into the reason: the consumer died on it.
            (
                head + b'"op":"add","customer_ids":[18446744073709551616],"batch_id":"p"}',
                "customer_ids: customer ids are integers",
            ),
            # Once read as a one-part replace: it wiped the audience down to [7].
            (
                head + b'"op":"replace","customer_ids":[7],"batch_id":"z","part":0,"parts":0}',
                "part must be in 1..parts",
            ),
            # msgspec raises RecursionError on it.
            (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "undecodable"),
            # 1.5 MiB: over the producer's default max_request_size, under this DLQ's.
            (
                head + b'"op":"add","customer_ids":[3],"batch_id":"' + b"b" * (3 << 19) + b'"}',
                "batch_id must be at most",
            ),
            # 3 MiB: over this consumer's DLQ limit (2 MiB), truncated.
            (b"\xff" * (3 << 20), "undecodable"),
        ]
        for value, _ in poison:
            await big.send_and_wait(topic, value=value, key=b"990:P")
        await send(big, topic, merchant_id=990, segment_type="P", op="add", customer_ids=[4])
    finally:
        await big.stop()
    c = await start(dlq_max_record_bytes=2 << 20)
    await eventually(lambda: _has_version(http, 990, "P", 2))
    assert (await audience(http, 990, "P"))["customers"] == 3
    assert c.dead_lettered == len(poison)
    got = await _read_dlq(clean, topic, len(poison))
    assert len(got) == len(poison)
    for (value, reason), m in zip(poison, got, strict=True):
        headers = dict(m.headers)
        assert headers["reason"].decode().startswith(reason), headers["reason"][:200]
        assert headers["source-topic"] == topic.encode()
        assert m.key == b"990:P"
        if len(value) < 2 << 20:
            assert m.value == value
            assert "truncated" not in headers
        else:
            assert m.value == value[: 64 * 1024]
            assert headers["truncated"] == b"true"
            assert headers["original-value-bytes"] == str(len(value)).encode()
    assert [int(dict(m.headers)["source-offset"]) for m in got] == list(range(1, 6))


class _FlakyAudiences(AudienceService):
    """The first ``failures`` calls of each kind find PostgreSQL unavailable."""

    def __init__(self, clean: Container, failures: int) -> None:
        super().__init__(PgAudienceStore(clean.store), max_ids=MAX_AUDIENCE_IDS)
        self.failures = failures
        self.calls: Counter[str] = Counter()

    def _maybe_fail(self, what: str) -> None:
        self.calls[what] += 1
        if self.calls[what] <= self.failures:
            raise StorageUnavailable("PostgreSQL is unavailable; nothing was changed")

    async def apply_kafka(self, *args: Any) -> int:
        self._maybe_fail("apply")
        return await super().apply_kafka(*args)

    async def next_offsets(self, topic: str) -> dict[int, int]:
        self._maybe_fail("offsets")
        return await super().next_offsets(topic)

    async def discard_stale_snapshots(self, older_than_s: float) -> list[StaleSnapshot]:
        self._maybe_fail("discard")
        return await super().discard_stale_snapshots(older_than_s)


async def test_consumer_outlives_postgresql_being_unavailable(
    http: aiohttp.ClientSession, producer: AIOKafkaProducer, consumer, topic: str, clean: Container
) -> None:  # type: ignore[no-untyped-def]
    start, stop = consumer
    for i in (1, 2):
        await send(producer, topic, merchant_id=7, segment_type="U", op="add", customer_ids=[i])
    flaky = _FlakyAudiences(clean, failures=2)
    # A part TTL of 1 s: the stale-snapshot clean-up runs every 0.5 s.
    settings = msgspec.structs.replace(
        clean.settings,
        kafka_topic=topic,
        kafka_dlq_topic=f"{topic}.dlq",
        kafka_group=topic,
        snapshot_part_ttl_s=1.0,
    )
    await start(flaky, settings=settings)
    await eventually(lambda: _has_version(http, 7, "U", 2), within_s=30)
    await eventually(lambda: _true(flaky.calls["discard"] > 4))
    assert flaky.calls["apply"] > 2
    await stop()  # raises what ended the consumer, if anything did


async def _true(value: bool) -> bool:
    return value


# -- log order: changes between the parts of a snapshot ------------------------------


async def _members(db: asyncpg.Connection, m: int, t: str) -> list[int]:
    rows = await db.fetch(
        "SELECT customer_id FROM audience_members JOIN audiences USING (generation)"
        " WHERE merchant_id = $1 AND segment_type = $2 ORDER BY customer_id",
        m,
        t,
    )
    return [r["customer_id"] for r in rows]


async def test_delta_between_snapshot_parts_applies_on_top_of_it_across_a_restart(
    http: aiohttp.ClientSession,
    producer: AIOKafkaProducer,
    consumer,
    topic: str,
    db: asyncpg.Connection,
) -> None:  # type: ignore[no-untyped-def]
    start, stop = consumer
    await send(producer, topic, merchant_id=5, segment_type="D", op="replace", customer_ids=[9])
    c = await start()
    await eventually(lambda: _has_version(http, 5, "D", 1))
    parts = [list(range(1, 101)), list(range(101, 201))]

    async def part(i: int) -> None:
        await send(
            producer,
            topic,
            merchant_id=5,
            segment_type="D",
            op="replace",
            customer_ids=parts[i],
            batch_id="snap",
            part=i + 1,
            parts=2,
        )

    await part(0)
    await send(producer, topic, merchant_id=5, segment_type="D", op="add", customer_ids=[500])
    await send(producer, topic, merchant_id=5, segment_type="D", op="remove", customer_ids=[1])

    async def waiting(n: int) -> bool:
        return await db.fetchval("SELECT count(*) FROM audience_pending") == n

    await eventually(lambda: waiting(3))  # the snapshot, and two changes behind it
    assert await _members(db, 5, "D") == [9]
    # The consumer stops mid-snapshot; what waits is in PostgreSQL.
    await stop()
    await send(producer, topic, merchant_id=5, segment_type="D", op="add", customer_ids=[600])
    c = await start()
    await eventually(lambda: waiting(4))
    assert (await audience(http, 5, "D"))["version"] == 1
    await part(1)
    await eventually(lambda: _has_version(http, 5, "D", 5))
    assert await _members(db, 5, "D") == [*range(2, 201), 500, 600]
    assert await waiting(0)
    assert await db.fetchval("SELECT count(*) FROM snapshot_parts") == 0
    history = await db.fetch(
        "SELECT operation, added, removed, customers FROM audience_history"
        " WHERE merchant_id = 5 ORDER BY version"
    )
    assert [tuple(r) for r in history] == [
        ("replace", 1, 0, 1),
        ("replace", 200, 1, 200),
        ("add", 1, 0, 201),
        ("remove", 0, 1, 200),
        ("add", 1, 0, 201),
    ]
    assert c.dead_lettered == 0


def _part(key: AudienceKey, batch: str, part: int, parts: int, ids: list[int]) -> AudienceChange:
    return AudienceChange(
        key, "replace", add=ids, batch_id=batch, part=part, parts=parts, source="kafka"
    )


def _delta(key: AudienceKey, op: str, ids: list[int]) -> AudienceChange:
    return AudienceChange(
        key,
        op,  # type: ignore[arg-type]
        add=ids if op != "remove" else (),
        remove=ids if op == "remove" else (),
        source="kafka",
        batch_id="d",
    )


async def test_changes_wait_in_log_order_behind_snapshots(
    clean: Container, db: asyncpg.Connection
) -> None:
    key = AudienceKey(8, "ORD")
    log = [
        _delta(key, "add", [1, 2]),
        _part(key, "A", 1, 2, [10, 11]),
        _delta(key, "add", [12]),
        _part(key, "B", 1, 2, [20, 12]),
        _delta(key, "replace", [30]),  # a whole replace waits too
        _part(key, "B", 2, 2, [21]),  # B is complete, but behind A
        _delta(key, "remove", [12]),
    ]
    for offset, change in enumerate(log):
        assert await clean.audiences.apply_kafka("o", 0, [(offset, change)]) == 1
    assert await _members(db, 8, "ORD") == [1, 2]
    # A's last part: A, then add 12, B, replace, remove 12 (everything, in log order).
    await clean.audiences.apply_kafka("o", 0, [(len(log), _part(key, "A", 2, 2, [11]))])
    assert await _members(db, 8, "ORD") == [30]
    history = await db.fetch(
        "SELECT operation, batch_id, customers FROM audience_history ORDER BY version"
    )
    assert [tuple(r) for r in history] == [
        ("add", "d", 2),
        ("replace", "A", 2),
        ("add", "d", 3),
        ("replace", "B", 3),
        ("replace", "d", 1),
        ("remove", "d", 1),
    ]
    assert await db.fetchval("SELECT count(*) FROM audience_pending") == 0


async def test_changes_behind_a_discarded_snapshot_apply_to_the_list_as_it_was(
    clean: Container, db: asyncpg.Connection
) -> None:
    key = AudienceKey(8, "DIS")
    batch = [
        (0, _delta(key, "replace", [1, 2])),
        (1, _part(key, "never", 1, 2, [7, 8])),
        (2, _delta(key, "add", [3])),
        (3, _delta(key, "remove", [1])),
    ]
    assert await clean.audiences.apply_kafka("d", 0, batch) == 4
    assert await _members(db, 8, "DIS") == [1, 2]
    stale = await clean.audiences.discard_stale_snapshots(0)
    assert [(s.batch_id, s.received, s.parts) for s in stale] == [("never", 1, 2)]
    # As if the snapshot had never been sent: replace, add 3, remove 1.
    assert await _members(db, 8, "DIS") == [2, 3]
    assert (await clean.audiences.get(key)).version == 3
    assert await db.fetchval("SELECT count(*) FROM audience_pending") == 0
    # Nothing waits any more: the next change applies at once.
    await clean.audiences.apply_kafka("d", 0, [(4, _delta(key, "add", [4]))])
    assert await _members(db, 8, "DIS") == [2, 3, 4]


async def test_late_duplicate_part_of_an_applied_snapshot_holds_nothing_back(
    clean: Container, db: asyncpg.Connection
) -> None:
    key = AudienceKey(8, "DUP")
    batch = [
        (0, _part(key, "s", 1, 2, [1])),
        (1, _part(key, "s", 2, 2, [2])),
        (2, _part(key, "s", 2, 2, [2])),  # the producer sent it twice
        (3, _delta(key, "add", [3])),
    ]
    await clean.audiences.apply_kafka("u", 0, batch)
    assert await _members(db, 8, "DUP") == [1, 2, 3]
    assert await db.fetchval("SELECT count(*) FROM audience_pending") == 0
    assert await db.fetchval("SELECT count(*) FROM snapshot_parts") == 0


async def test_a_complete_snapshot_behind_a_discarded_one_applies_in_its_turn(
    clean: Container, db: asyncpg.Connection
) -> None:
    key = AudienceKey(8, "TURN")
    batch = [
        (0, _delta(key, "replace", [1, 2])),
        (1, _part(key, "never", 1, 2, [7])),
        (2, _delta(key, "remove", [1])),
        (3, _part(key, "B", 1, 2, [50])),
        (4, _part(key, "B", 2, 2, [51])),  # complete, but behind "never"
        (5, _delta(key, "add", [52])),
    ]
    await clean.audiences.apply_kafka("t", 0, batch)
    assert await _members(db, 8, "TURN") == [1, 2]
    stale = await clean.audiences.discard_stale_snapshots(0)
    assert [s.batch_id for s in stale] == ["never"]
    assert await _members(db, 8, "TURN") == [50, 51, 52]
    history = await db.fetch(
        "SELECT operation, batch_id, customers FROM audience_history ORDER BY version"
    )
    assert [tuple(r) for r in history] == [
        ("replace", "d", 2),
        ("remove", "d", 1),
        ("replace", "B", 2),
        ("add", "d", 3),
    ]
    assert await db.fetchval("SELECT count(*) FROM audience_pending") == 0
    assert await db.fetchval("SELECT count(*) FROM snapshot_parts") == 0
