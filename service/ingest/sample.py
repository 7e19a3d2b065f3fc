"""``segments produce-sample``: publish a realistic audience the way data engineering does."""

from __future__ import annotations

import random
import uuid

from aiokafka import AIOKafkaProducer

from service.ingest.messages import snapshot


async def produce_sample(
    bootstrap: str,
    topic: str,
    *,
    merchant_id: int,
    segment_type: str,
    customers: int,
    parts: int,
) -> None:
    """A `replace` snapshot of ``customers`` random ids, split into ``parts`` messages."""
    ids = random.sample(range(1, 50 * customers + 1), customers)  # nosec B311  # sample data
    messages = snapshot(merchant_id, segment_type, ids, parts, uuid.uuid4().hex)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=32 * 1024 * 1024
    )
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()
    print(f"published {customers} customers of {merchant_id}:{segment_type} in {parts} parts")
