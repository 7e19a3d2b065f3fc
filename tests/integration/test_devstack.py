"""The embedded dev/test stack: each server answers, survives what it should, and cleans up.

Async clients run under ``asyncio.run`` so these tests need no async fixtures.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.devstack import EmbeddedStack, free_port


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path_factory.mktemp("devstack"), fast=True) as running:
        yield running


async def _pg_fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def _exists(pid: int) -> bool:
    """True if ``pid`` is a live process; zombies (exited, not yet reaped by init) count as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_urls(stack: EmbeddedStack) -> None:
    assert stack.postgres.url == f"postgresql://postgres@127.0.0.1:{stack.postgres.port}/segments"
    assert stack.valkey.url == f"redis://127.0.0.1:{stack.valkey.port}/0"
    assert stack.broker.url == f"127.0.0.1:{stack.broker.port}"
    assert len({s.port for s in stack.servers}) == 3
    assert all(s.running and s.pid is not None for s in stack.servers)


def test_postgres_answers(stack: EmbeddedStack) -> None:
    assert asyncio.run(_pg_fetchval(stack.postgres.url, "SELECT 1")) == 1
    assert asyncio.run(_pg_fetchval(stack.postgres.url, "SELECT current_database()")) == "segments"


def test_valkey_set_get(stack: EmbeddedStack) -> None:
    client = redis.Redis.from_url(stack.valkey.url)
    try:
        client.set("devstack:k", "v")
        assert client.get("devstack:k") == b"v"
    finally:
        client.close()


def test_broker_round_trip(stack: EmbeddedStack) -> None:
    topic = f"devstack-{uuid.uuid4().hex[:8]}"

    async def round_trip() -> list[bytes | None]:
        producer = AIOKafkaProducer(bootstrap_servers=stack.broker.url)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"hello", key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=stack.broker.url, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            received: list[bytes | None] = []
            for _ in range(20):
                batches = await consumer.getmany(timeout_ms=500)
                received += [record.value for records in batches.values() for record in records]
                if received:
                    break
            return received
        finally:
            await consumer.stop()

    assert asyncio.run(asyncio.wait_for(round_trip(), 20)) == [b"hello"]


def test_postgres_data_survives_kill(stack: EmbeddedStack) -> None:
    pg = stack.postgres

    async def scenario() -> object:
        # Keep a session open across the crash: its backend must die with the postmaster,
        # or the restarted server refuses the still-attached shared memory.
        conn = await asyncpg.connect(pg.url, timeout=10)
        await conn.execute("CREATE TABLE survivor (id int PRIMARY KEY, name text)")
        await conn.execute("INSERT INTO survivor VALUES (1, 'still here')")
        old_pid, old_pids = pg.pid, pg.pids  # postmaster + backends, checkpointer, ...
        assert len(old_pids) > 2
        pg.kill()
        assert not pg.running and pg.pid is None
        assert not any(_exists(pid) for pid in old_pids)
        conn.terminate()
        pg.start()  # crash recovery; postgres ignores the stale postmaster.pid
        assert pg.pid != old_pid
        return await _pg_fetchval(pg.url, "SELECT name FROM survivor WHERE id = 1")

    assert asyncio.run(scenario()) == "still here"


def test_valkey_data_survives_restart(stack: EmbeddedStack) -> None:
    vk = stack.valkey
    port = vk.port
    client = redis.Redis.from_url(vk.url)
    try:
        client.set("devstack:durable", "yes")
    finally:
        client.close()
    vk.stop()
    vk.stop()  # idempotent
    assert not vk.running
    vk.start()
    assert vk.port == port
    client = redis.Redis.from_url(vk.url)
    try:
        assert client.get("devstack:durable") == b"yes"
    finally:
        client.close()


def test_pause_and_resume(stack: EmbeddedStack) -> None:
    vk = stack.valkey
    client = redis.Redis.from_url(vk.url, socket_timeout=0.3)
    try:
        vk.pause()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            vk.resume()
        client.connection_pool.disconnect()  # drop the connection with the stale reply
        assert client.ping() is True
    finally:
        client.close()


def test_stop_leaves_no_processes(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path, fast=True, persistent=False)
    stack.start()
    try:
        # Every server leads its own process group: collect the postgres backends too.
        pids = [pid for s in stack.servers for pid in s.pids]
        assert len(pids) > 3
        assert all(os.getpgid(s.pid or -1) == s.pid for s in stack.servers)
    finally:
        stack.stop()
    stack.stop()  # idempotent
    assert not any(s.running for s in stack.servers)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
