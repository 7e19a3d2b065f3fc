"""`segments consume` as a process: Kafka -> PostgreSQL, metrics, and a clean SIGTERM.

The real entry point (``python -m service.cli consume``) runs as a subprocess against
the session's embedded stack, on a topic and consumer group of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from devstack import EmbeddedStack, free_port
from service.bootstrap import Container
from service.domain.audiences import AudienceKey, AudienceNotFound
from service.domain.errors import StorageUnavailable
from service.ingest.messages import AudienceMessage, encode
from service.settings import Settings
from tests.conftest import scrape

APPLIED = "segments_kafka_messages_applied_total"
LAG = "segments_kafka_consumer_lag"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no stderr file)"
    return "\n".join(text.splitlines()[-lines:])


async def _until(
    check: Callable[[], Awaitable[bool]],
    within_s: float,
    what: str,
    proc: asyncio.subprocess.Process,
    stderr: Path,
) -> None:
    """Poll ``check`` until it holds; fail early if the consumer process has exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        code = proc.returncode
        assert code is None, f"consumer exited ({code}) before {what}:\n{_tail(stderr)}"
        assert loop.time() < deadline, f"{what}: not within {within_s} s:\n{_tail(stderr)}"
        await asyncio.sleep(0.2)


def _by_partition(url: str) -> dict[str, dict[str, float]]:
    """Sample name -> {partition label or "": value}."""
    return {
        name: {labels.get("partition", ""): value for labels, value in samples}
        for name, samples in scrape(url).items()
    }


async def _send(producer: AIOKafkaProducer, topic: str, **fields: object) -> None:
    fields.setdefault("batch_id", uuid.uuid4().hex)
    key, value = encode(AudienceMessage(**fields))  # type: ignore[arg-type]
    await producer.send_and_wait(topic, value=value, key=key)


async def _start_consume(
    settings: Settings, topic: str, tmp_path: Path, extra: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, Path]:
    """`python -m service.cli consume` on ``topic`` (its own group), stderr to a file."""
    # Only the settings this test means, and no multiprocess metrics directory.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SEGMENTS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env |= {
        "SEGMENTS_DATABASE_URL": settings.database_url,
        "SEGMENTS_REDIS_URL": settings.redis_url,
        "SEGMENTS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SEGMENTS_KAFKA_TOPIC": topic,
        "SEGMENTS_KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "SEGMENTS_KAFKA_GROUP": topic,
        "SEGMENTS_LOG_JSON": "false",
        "SEGMENTS_LOG_LEVEL": "INFO",
        **(extra or {}),
    }
    stderr = tmp_path / f"consume-{topic}.stderr"
    with stderr.open("wb") as err:
        # Our own interpreter and module, fixed arguments.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "consume",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    return proc, stderr


async def test_consume_process_applies_reports_and_commits_on_sigterm(
    clean: Container, db: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = clean.settings
    topic = f"consumer-process-{uuid.uuid4().hex[:8]}"
    group = topic
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    vip, new = AudienceKey(71, "PROC_VIP"), AudienceKey(72, "PROC_NEW")

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    produced = 0

    async def send(key: AudienceKey, op: str, ids: list[int]) -> None:
        nonlocal produced
        await _send(
            producer,
            topic,
            merchant_id=key.merchant_id,
            segment_type=key.segment_type,
            op=op,
            customer_ids=ids,
        )
        produced += 1

    # Before the consumer starts (this also creates the topic): a snapshot and deltas.
    await send(vip, "replace", [1, 2, 3])
    await send(vip, "add", [4])
    await send(vip, "remove", [1])
    await send(new, "replace", [10, 11])

    proc, stderr = await _start_consume(
        settings, topic, tmp_path, {"SEGMENTS_METRICS_PORT": str(metrics_port)}
    )
    try:

        async def has(key: AudienceKey, version: int, customers: int) -> bool:
            try:
                info = await clean.audiences.get(key)
            except AudienceNotFound:
                return False
            return (info.version, info.customers) == (version, customers)

        async def applied() -> bool:
            return await has(vip, 3, 3) and await has(new, 1, 2)

        # The group join of a new consumer takes a few seconds on the embedded broker.
        await _until(applied, 60, "the backlog applied", proc, stderr)

        # A delta while it runs.
        await send(vip, "add", [5, 6])
        await _until(lambda: has(vip, 4, 5), 30, "the live delta applied", proc, stderr)

        checker = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
        )
        await checker.start()
        try:
            partitions = await producer.partitions_for(topic)
            assert partitions, f"no partitions known for {topic}"
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            ends = await checker.end_offsets(tps)
            assert sum(ends.values()) == produced, (ends, produced)

            # PostgreSQL holds the next offset of every partition that had messages.
            stored = {
                r["partition"]: r["next_offset"]
                for r in await db.fetch(
                    "SELECT partition, next_offset FROM ingest_offsets WHERE topic = $1", topic
                )
            }
            assert stored == {tp.partition: n for tp, n in ends.items() if n > 0}

            # Metrics: everything applied, no lag on any partition (they may trail a bit).
            last: dict[str, dict[str, float]] = {}

            async def caught_up() -> bool:
                nonlocal last
                try:
                    last = await asyncio.to_thread(_by_partition, metrics_url)
                except OSError:
                    return False
                lag = last.get(LAG, {})
                return last.get(APPLIED, {}).get("", 0) >= produced and all(
                    lag.get(str(tp.partition)) == 0 for tp in tps
                )

            try:
                await _until(caught_up, 15, "metrics caught up", proc, stderr)
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\nlast scrape: {APPLIED}={last.get(APPLIED)}"
                    f" {LAG}={last.get(LAG)}; produced {produced}, partitions {tps}"
                ) from None
            assert last[APPLIED][""] >= produced
            assert {p: last[LAG].get(str(p)) for p in sorted(partitions)} == dict.fromkeys(
                sorted(partitions), 0
            )

            # SIGTERM: the process finishes cleanly and promptly.
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                raise AssertionError(f"no exit 30 s after SIGTERM:\n{_tail(stderr)}") from None
            assert proc.returncode == 0, f"exit code {proc.returncode}:\n{_tail(stderr)}"

            # Kafka holds, for the group, exactly what was applied: the end of each
            # partition (read without joining the group).
            committed = {tp: await checker.committed(tp) for tp in tps}
            want = {tp: (n if n > 0 else None) for tp, n in ends.items()}
            assert committed == want, f"committed {committed}, end offsets {ends}"
        finally:
            await checker.stop()
    finally:
        await producer.stop()
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


async def test_consume_process_survives_postgres_stopped_and_paused(
    clean: Container, stack: EmbeddedStack, tmp_path: Path
) -> None:
    """PostgreSQL stopped for 10 s, then frozen (SIGSTOP) for 8 s: the consumer keeps
    running (its periodic clean-up of stale snapshots included: a short part TTL makes
    it run every second) and applies what was published meanwhile once it is back."""
    settings = clean.settings
    topic = f"consumer-pg-down-{uuid.uuid4().hex[:8]}"
    key = AudienceKey(73, "PROC_PG")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()

    async def add(cid: int) -> None:
        await _send(
            producer,
            topic,
            merchant_id=key.merchant_id,
            segment_type=key.segment_type,
            op="add",
            customer_ids=[cid],
        )

    async def has(version: int) -> bool:
        try:
            info = await clean.audiences.get(key)
        except (AudienceNotFound, StorageUnavailable):
            return False
        return (info.version, info.customers) == (version, version)

    await add(1)
    proc, stderr = await _start_consume(
        settings, topic, tmp_path, {"SEGMENTS_SNAPSHOT_PART_TTL_S": "2"}
    )
    try:
        await _until(lambda: has(1), 60, "the first message applied", proc, stderr)

        async def outage(begin: Callable[[], None], end: Callable[[], None], cid: int) -> None:
            await asyncio.to_thread(begin)
            try:
                await add(cid)  # published while PostgreSQL is away
                for _ in range(40):
                    await asyncio.sleep(0.25)
                    assert proc.returncode is None, f"consumer exited:\n{_tail(stderr)}"
            finally:
                await asyncio.to_thread(end)

        await outage(stack.postgres.stop, stack.postgres.start, 2)
        await add(3)  # published after it came back
        await _until(lambda: has(3), 60, "messages applied after the restart", proc, stderr)

        await outage(stack.postgres.pause, stack.postgres.resume, 4)
        await add(5)
        await _until(lambda: has(5), 60, "messages applied after the pause", proc, stderr)

        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0, f"exit code {proc.returncode}:\n{_tail(stderr)}"
    finally:
        await producer.stop()
        if stack.postgres.running:
            stack.postgres.resume()
        else:
            await asyncio.to_thread(stack.postgres.start)
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
