"""The audience consumer (``segments consume``): Kafka -> PostgreSQL, at least once.

Per partition batch: decode every message (poison messages go to the dead-letter
topic with the reason in a header), apply the batch and the partition's next offset in
one PostgreSQL transaction, and only then commit the offset to Kafka.  A crash at any
point re-delivers messages that PostgreSQL already knows it applied, and they are
skipped, so a re-delivered batch changes nothing the second time.  On assignment
the consumer seeks to the positions PostgreSQL holds.

Every message gets a verdict, whatever its bytes: applied (or staged behind a snapshot,
see ``persistence/audiences/``), skipped as a re-delivery, or dead-lettered with its
reason.  An unexpected error while decoding one message dead-letters that message
(reason ``internal error: ...``).  A dead-letter record the DLQ refuses as too large is
sent again with the start of the value and key only (headers ``truncated``,
``original-value-bytes`` and ``original-key-bytes``; the reason and the source
coordinates are always kept).

The consumer outlives its stores: while PostgreSQL is stopped or frozen, a batch that
cannot be applied is fetched again after a pause (nothing of it was applied), and the
periodic clean-up of stale snapshots waits for the next round.  Any other error in a
batch is logged with its traceback and the batch retried with a growing pause, rather
than ending the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import ConsumerRecord

from service.domain.audiences import AudienceChange, AudienceService
from service.domain.errors import StorageUnavailable
from service.ingest.messages import InvalidMessage, decode
from service.observability import KAFKA_APPLIED, KAFKA_DLQ, KAFKA_LAG
from service.settings import Settings

log = logging.getLogger(__name__)

# The stale-snapshot clean-up runs this often, or twice per part TTL if that is shorter.
STALE_CHECK_S = 30.0
STALE_CHECK_MIN_S = 0.5

# Pause before a batch that failed is fetched again: doubles per failure, up to 5 s
# while a store is away (it resumes soon after the store is back), 30 s after an
# unexpected error (its traceback is logged each time).
RETRY_PAUSE_S = 1.0
RETRY_PAUSE_MAX_S = 5.0
RETRY_PAUSE_MAX_UNEXPECTED_S = 30.0

# The largest dead-letter record the producer sends whole (the consumer fetches up to
# 64 MiB at once); the broker (message.max.bytes, or the topic's max.message.bytes) may
# refuse less, and then the record is truncated.
DLQ_MAX_RECORD_BYTES = 64 * 1024 * 1024
# What a truncated dead-letter record keeps of the value and key: well under Kafka's
# default limit of 1 MiB.
DLQ_TRUNCATED_VALUE_BYTES = 64 * 1024
DLQ_TRUNCATED_KEY_BYTES = 1024
REASON_MAX_CHARS = 1000

_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, even one whose ``str()`` fails."""
    try:
        text = str(exc)
    except Exception:
        text = "(no message)"
    return f"{type(exc).__name__}: {text}"


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: AIOKafkaConsumer, audiences: AudienceService, topic: str) -> None:
        self._consumer = consumer
        self._audiences = audiences
        self._topic = topic

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Nothing to flush: every applied batch was committed before the next poll.
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            stored = await self._audiences.next_offsets(self._topic)
        except StorageUnavailable as exc:
            # Kafka's committed offsets are never ahead of PostgreSQL's (they are
            # committed after it), and what PostgreSQL already applied is skipped.
            log.warning("assigned %s; positions from Kafka (%s)", sorted(assigned), exc)
            return
        for tp in assigned:
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
        log.info("assigned %s; positions from PostgreSQL: %s", sorted(assigned), stored)


class AudienceConsumer:
    def __init__(
        self,
        settings: Settings,
        audiences: AudienceService,
        max_ids: int,
        *,
        dlq_max_record_bytes: int = DLQ_MAX_RECORD_BYTES,
    ) -> None:
        self._settings = settings
        self._audiences = audiences
        self._max_ids = max_ids
        self._dlq_max_record_bytes = dlq_max_record_bytes
        self._stale_check_s = max(
            STALE_CHECK_MIN_S, min(STALE_CHECK_S, settings.snapshot_part_ttl_s / 2)
        )
        # Per partition, the last offset this process dead-lettered: a batch fetched
        # again (after a failure) does not dead-letter its messages twice.
        self._dead_lettered_up_to: dict[TopicPartition, int] = {}
        self._failures: dict[TopicPartition, int] = {}
        self._stop = asyncio.Event()
        self.applied = 0
        self.dead_lettered = 0

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        self._stop = stop
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.kafka_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=32 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # The group join waits about half the session timeout on a new member:
            # the brokers' minimum (6 s) gets a starting consumer its partitions sooner.
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            acks="all",
            max_request_size=self._dlq_max_record_bytes,
        )
        await producer.start()
        try:
            await consumer.start()
            consumer.subscribe(
                [s.kafka_topic], listener=_SeekToStored(consumer, self._audiences, s.kafka_topic)
            )
            next_stale_check = 0.0
            while not stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=500, max_records=s.kafka_max_batch)
                except RecordTooLargeError as exc:
                    # Only from a broker that cuts records at the fetch size (fetch
                    # API < v3): aiokafka has skipped the record; the error names it.
                    log.error("a record could not be fetched, skipped: %s", exc)
                    continue
                for tp, messages in batches.items():
                    await self._batch(consumer, producer, tp, messages)
                await self._report_lag(consumer)
                if time.monotonic() >= next_stale_check:
                    await self._discard_stale()
                    next_stale_check = time.monotonic() + self._stale_check_s
        except Exception:
            # Logged here, first: what the process does on the way out (closing a pool
            # on a stalled PostgreSQL, say) must not hide why it stopped.
            log.exception("the consumer stopped on an unexpected error")
            raise
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _batch(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        messages: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        """One partition's batch: a verdict for every message, applied with the
        partition's next offset in one transaction, then the offset committed."""
        if not messages:
            return
        try:
            changes = [(m.offset, await self._verdict(producer, m)) for m in messages]
            applied = await self._audiences.apply_kafka(tp.topic, tp.partition, changes)
        except (StorageUnavailable, KafkaError) as exc:
            # PostgreSQL, or the dead-letter topic, is away.  Nothing was applied: fetch
            # the same messages again after a pause, rather than exit and replay them
            # on restart.
            await self._retry(consumer, tp, messages[0].offset, exc, unexpected=False)
            return
        except Exception as exc:
            await self._retry(consumer, tp, messages[0].offset, exc, unexpected=True)
            return
        self._failures.pop(tp, None)
        self.applied += applied
        KAFKA_APPLIED.inc(applied)
        try:
            await consumer.commit({tp: messages[-1].offset + 1})
        except KafkaError as exc:
            # PostgreSQL holds the position: a re-delivery is skipped.
            log.warning("partition %s: offset commit to Kafka failed: %s", tp.partition, exc)

    async def _retry(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        offset: int,
        exc: Exception,
        unexpected: bool,
    ) -> None:
        failures = self._failures[tp] = self._failures.get(tp, 0) + 1
        most = RETRY_PAUSE_MAX_UNEXPECTED_S if unexpected else RETRY_PAUSE_MAX_S
        pause = min(most, RETRY_PAUSE_S * 2 ** min(failures - 1, 10))
        log.warning(
            "partition %s: batch from offset %d not applied (%s); again in %.0f s",
            tp.partition,
            offset,
            _describe(exc),
            pause,
            exc_info=exc if unexpected else None,
        )
        if tp in consumer.assignment():
            consumer.seek(tp, offset)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), pause)

    async def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                with contextlib.suppress(KafkaError):
                    lag = highwater - await consumer.position(tp)
                    KAFKA_LAG.labels(str(tp.partition)).set(max(0, lag))

    async def _discard_stale(self) -> None:
        try:
            await self._audiences.discard_stale_snapshots(self._settings.snapshot_part_ttl_s)
        except StorageUnavailable as exc:
            log.warning("stale snapshot clean-up skipped: %s", exc)
        except Exception:
            log.exception("stale snapshot clean-up failed")

    async def _verdict(
        self, producer: AIOKafkaProducer, m: ConsumerRecord[bytes, bytes]
    ) -> AudienceChange | None:
        """The message's change, or None once it is dead-lettered."""
        try:
            return decode(m.key, m.value, self._max_ids)
        except InvalidMessage as exc:
            reason = str(exc)
        except Exception as exc:
            log.exception("message %s:%s: decoding failed", m.partition, m.offset)
            reason = f"internal error: {_describe(exc)}"
        await self._dead_letter(producer, m, reason)
        return None

    async def _dead_letter(
        self, producer: AIOKafkaProducer, m: ConsumerRecord[bytes, bytes], reason: str
    ) -> None:
        reason = reason[:REASON_MAX_CHARS]
        log.warning("message %s:%s set aside: %s", m.partition, m.offset, reason)
        tp = TopicPartition(m.topic, m.partition)
        if self._dead_lettered_up_to.get(tp, -1) >= m.offset:
            return  # this process sent it already (its batch is being retried)
        headers = [
            ("reason", reason.encode("utf-8", "backslashreplace")),
            ("source-topic", m.topic.encode("utf-8", "backslashreplace")),
            ("source-partition", str(m.partition).encode()),
            ("source-offset", str(m.offset).encode()),
        ]
        topic = self._settings.kafka_dlq_topic
        value_bytes, key_bytes = len(m.value or b""), len(m.key or b"")
        truncated = [
            *headers,
            ("truncated", b"true"),
            ("original-value-bytes", str(value_bytes).encode()),
            ("original-key-bytes", str(key_bytes).encode()),
        ]
        # The whole record; else the start of its value and key; else the headers only.
        attempts: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
            (m.value, m.key, headers),
            (
                None if m.value is None else m.value[:DLQ_TRUNCATED_VALUE_BYTES],
                None if m.key is None else m.key[:DLQ_TRUNCATED_KEY_BYTES],
                truncated,
            ),
            (None, None, truncated),
        ]
        for i, (value, key, record_headers) in enumerate(attempts):
            try:
                await producer.send_and_wait(topic, value=value, key=key, headers=record_headers)
                break
            except _TOO_LARGE as exc:
                if i == len(attempts) - 1:
                    raise
                log.warning(
                    "message %s:%s (%d bytes) is too large for %s (%s): sending it truncated",
                    m.partition,
                    m.offset,
                    value_bytes + key_bytes,
                    topic,
                    exc,
                )
        self._dead_lettered_up_to[tp] = m.offset
        self.dead_lettered += 1
        KAFKA_DLQ.inc()
