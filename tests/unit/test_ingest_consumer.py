"""The consumer's verdict on one message, with a stand-in for the DLQ producer.

Every message gets a verdict: an unexpected error while decoding one dead-letters it
(reason ``internal error: ...``) instead of ending the consumer, and a dead-letter
record the DLQ refuses as too large is sent truncated, with the reason and the source
coordinates kept.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from service.domain.audiences import AudienceService
from service.ingest import consumer as consumer_module
from service.ingest.consumer import (
    DLQ_TRUNCATED_KEY_BYTES,
    DLQ_TRUNCATED_VALUE_BYTES,
    AudienceConsumer,
)
from service.settings import load_settings


class FakeProducer:
    """Takes records up to ``limit`` bytes (value and key), like a broker's
    message.max.bytes; refuses larger ones as the broker (or aiokafka) does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(
        self, topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        if len(value or b"") + len(key or b"") > self.limit:
            raise MessageSizeTooLargeError()
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": dict(headers)})


def record(value: bytes | None, key: bytes | None = b"990:P", offset: int = 7) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord(
        topic="merchant-segments",
        partition=3,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=[],
    )


def make_consumer() -> AudienceConsumer:
    settings = load_settings({"SEGMENTS_KAFKA_DLQ_TOPIC": "dlq"})
    return AudienceConsumer(settings, AudienceService(store=None), max_ids=100)  # type: ignore[arg-type]


HUGE_ID = (
    b'{"merchant_id":990,"segment_type":"P","op":"add",'
    b'"customer_ids":[18446744073709551616],"batch_id":"p"}'
)


async def test_a_customer_id_over_64_bits_is_dead_lettered_with_its_reason() -> None:
    c, producer = make_consumer(), FakeProducer(limit=1 << 20)
    assert await c._verdict(producer, record(HUGE_ID)) is None  # type: ignore[arg-type]
    (sent,) = producer.sent
    assert sent["value"] == HUGE_ID
    assert sent["headers"]["reason"].startswith(b"customer_ids: customer ids are integers")
    assert sent["headers"]["source-offset"] == b"7"
    assert c.dead_lettered == 1


async def test_unexpected_decoding_error_dead_letters_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(key: bytes | None, value: bytes | None, max_ids: int) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(consumer_module, "decode", broken)
    c, producer = make_consumer(), FakeProducer(limit=1 << 20)
    assert await c._verdict(producer, record(b"{}")) is None  # type: ignore[arg-type]
    (sent,) = producer.sent
    assert sent["headers"]["reason"] == b"internal error: ZeroDivisionError: a bug"
    assert sent["topic"] == "dlq"


async def test_record_too_large_for_the_dlq_is_sent_truncated() -> None:
    value = b"{" + b"x" * (3 << 20)  # 3 MiB and not JSON
    key = b"k" * 5000
    c, producer = make_consumer(), FakeProducer(limit=1 << 20)
    assert await c._verdict(producer, record(value, key=key, offset=41)) is None  # type: ignore[arg-type]
    (sent,) = producer.sent
    assert sent["value"] == value[:DLQ_TRUNCATED_VALUE_BYTES]
    assert sent["key"] == key[:DLQ_TRUNCATED_KEY_BYTES]
    h = sent["headers"]
    assert h["reason"].startswith(b"undecodable")
    assert (h["source-topic"], h["source-partition"], h["source-offset"]) == (
        b"merchant-segments",
        b"3",
        b"41",
    )
    assert (h["truncated"], h["original-value-bytes"], h["original-key-bytes"]) == (
        b"true",
        str(len(value)).encode(),
        b"5000",
    )
    assert c.dead_lettered == 1


async def test_a_dlq_taking_less_than_the_truncated_record_gets_the_headers() -> None:
    c, producer = make_consumer(), FakeProducer(limit=1000)
    value = b"?" * 100_000
    assert await c._verdict(producer, record(value, offset=9)) is None  # type: ignore[arg-type]
    (sent,) = producer.sent
    assert (sent["value"], sent["key"]) == (None, None)
    h = sent["headers"]
    assert h["reason"].startswith(b"undecodable")
    assert (h["source-offset"], h["truncated"], h["original-value-bytes"]) == (
        b"9",
        b"true",
        b"100000",
    )


async def test_a_batch_fetched_again_does_not_dead_letter_twice() -> None:
    c, producer = make_consumer(), FakeProducer(limit=1 << 20)
    for _ in range(2):  # the same batch, fetched again after PostgreSQL failed
        for offset in (1, 2):
            assert await c._verdict(producer, record(b"?", offset=offset)) is None  # type: ignore[arg-type]
    assert [s["headers"]["source-offset"] for s in producer.sent] == [b"1", b"2"]
    assert c.dead_lettered == 2


def test_stale_snapshot_clean_up_runs_at_least_twice_per_part_ttl() -> None:
    def every(ttl: str) -> float:
        settings = load_settings({"SEGMENTS_SNAPSHOT_PART_TTL_S": ttl})
        return AudienceConsumer(settings, None, 1)._stale_check_s  # type: ignore[arg-type]

    assert (every("600"), every("20"), every("0")) == (30.0, 10.0, 0.5)
