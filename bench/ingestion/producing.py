"""Publishing one ``replace`` snapshot with the project's own encoder."""

from __future__ import annotations

import time
import uuid

from aiokafka import AIOKafkaProducer

from service.ingest.messages import snapshot

MERCHANT_ID = 42
SEGMENT_TYPE = "BENCH_LOYAL"


async def produce(bootstrap: str, topic: str, ids: list[int], parts: int) -> tuple[float, int]:
    """Publish one snapshot; returns (seconds, largest message in bytes)."""
    messages = snapshot(MERCHANT_ID, SEGMENT_TYPE, ids, parts, uuid.uuid4().hex)
    largest = max(len(value) for _, value in messages)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=32 * 1024 * 1024
    )
    await producer.start()
    try:
        started = time.perf_counter()
        # send_and_wait raises if the broker refuses a message (e.g. too large).
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key)
        return time.perf_counter() - started, largest
    finally:
        await producer.stop()
