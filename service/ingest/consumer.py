"""The audience consumer (``segments consume``): Kafka -> PostgreSQL, at least once.

Per partition batch: decode every message (poison messages go to the dead-letter
topic with the reason in a header), apply the batch and the partition's next offset in
one PostgreSQL transaction, and only then commit the offset to Kafka.  A crash at any
point re-delivers messages that PostgreSQL already knows it applied, and they are
skipped, so a re-delivered batch changes nothing the second time.  On assignment
the consumer seeks to the positions PostgreSQL holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from service.domain.audiences import AudienceChange, AudienceService
from service.domain.errors import StorageUnavailable
from service.ingest.messages import InvalidMessage, decode
from service.observability import KAFKA_APPLIED, KAFKA_DLQ, KAFKA_LAG
from service.settings import Settings

log = logging.getLogger(__name__)

STALE_CHECK_S = 30.0


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: AIOKafkaConsumer, audiences: AudienceService, topic: str) -> None:
        self._consumer = consumer
        self._audiences = audiences
        self._topic = topic

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Nothing to flush: every applied batch was committed before the next poll.
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        stored = await self._audiences.next_offsets(self._topic)
        for tp in assigned:
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
        log.info("assigned %s; positions from PostgreSQL: %s", sorted(assigned), stored)


class AudienceConsumer:
    def __init__(self, settings: Settings, audiences: AudienceService, max_ids: int) -> None:
        self._settings = settings
        self._audiences = audiences
        self._max_ids = max_ids
        self.applied = 0
        self.dead_lettered = 0

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.kafka_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=32 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # The group join waits about half the session timeout on a new member:
            # 6 s (the brokers' minimum by default) instead of 10 s: partitions were
            # assigned after 3.4 s instead of 5.4 s in bench/ingest.py.
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
        )
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await producer.start()
        await consumer.start()
        consumer.subscribe(
            [s.kafka_topic], listener=_SeekToStored(consumer, self._audiences, s.kafka_topic)
        )
        next_stale_check = 0.0
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=s.kafka_max_batch)
                for tp, messages in batches.items():
                    changes: list[tuple[int, AudienceChange | None]] = []
                    for m in messages:
                        changes.append((m.offset, await self._decode(producer, m)))
                    try:
                        applied = await self._audiences.apply_kafka(tp.topic, tp.partition, changes)
                    except StorageUnavailable as exc:
                        # Nothing was applied: fetch the same messages again after a
                        # pause, rather than exit and replay them on restart.
                        log.warning("partition %s: %s; retrying in 1 s", tp.partition, exc)
                        consumer.seek(tp, messages[0].offset)
                        await asyncio.sleep(1)
                        continue
                    self.applied += applied
                    KAFKA_APPLIED.inc(applied)
                    await consumer.commit({tp: messages[-1].offset + 1})
                for tp in consumer.assignment():
                    highwater = consumer.highwater(tp)
                    if highwater is not None:
                        lag = highwater - await consumer.position(tp)
                        KAFKA_LAG.labels(str(tp.partition)).set(max(0, lag))
                if time.monotonic() >= next_stale_check:
                    await self._audiences.discard_stale_snapshots(s.snapshot_part_ttl_s)
                    next_stale_check = time.monotonic() + STALE_CHECK_S
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            await producer.stop()

    async def _decode(
        self, producer: AIOKafkaProducer, m: ConsumerRecord[bytes, bytes]
    ) -> AudienceChange | None:
        try:
            return decode(m.key, m.value, self._max_ids)
        except InvalidMessage as exc:
            reason = str(exc)[:1000]
            log.warning("message %s:%s set aside: %s", m.partition, m.offset, reason)
            await producer.send_and_wait(
                self._settings.kafka_dlq_topic,
                value=m.value,
                key=m.key,
                headers=[
                    ("reason", reason.encode()),
                    ("source-topic", m.topic.encode()),
                    ("source-partition", str(m.partition).encode()),
                    ("source-offset", str(m.offset).encode()),
                ],
            )
            self.dead_lettered += 1
            KAFKA_DLQ.inc()
            return None
