"""The embedded dev/test stack: each server answers, survives what it should, and cleans up.

Async clients run under ``asyncio.run`` so these tests need no async fixtures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devstack import (
    ChildState,
    CommandChild,
    EmbeddedBroker,
    EmbeddedStack,
    EmbeddedValkey,
    RestartPolicy,
    ServerChild,
    Supervisor,
    describe_exit,
    free_port,
)


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


# -- the supervisor of `segments dev` ------------------------------------------------------------

#: Restarts quickly, gives up after three failures: keeps these tests short.
FAST = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, max_failures=3)
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
FAILS = [sys.executable, "-c", "raise SystemExit(1)"]


def _until(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        time.sleep(0.02)


@contextmanager
def _supervising(sup: Supervisor) -> Iterator[dict[str, int]]:
    """``sup.run()`` in a thread until the block ends; then everything is stopped."""
    stop = threading.Event()
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=sup.run(stop.is_set)))
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(30)
        sup.stop()
    assert not thread.is_alive()


def _run_until_given_up(sup: Supervisor, within_s: float = 30) -> int:
    deadline = time.monotonic() + within_s
    code = sup.run(lambda: time.monotonic() > deadline)
    assert code != 0, f"the supervisor did not give up within {within_s} s"
    return code


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "segments.dev")


def test_restart_delays_double_up_to_the_cap() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_supervisor_restarts_only_the_child_that_died(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segments.dev")
    sup = Supervisor(FAST, poll_s=0.02)
    try:
        sup.start(CommandChild("a", SLEEPER))
        sup.start(CommandChild("b", SLEEPER))
        a, b = sup.child("a"), sup.child("b")
        old_a, old_b = a.pid, b.pid
        assert old_a is not None and old_b is not None
        with _supervising(sup) as result:
            os.kill(old_a, signal.SIGKILL)
            _until(lambda: a.pid not in (None, old_a), 5, "a restarted")
            _until(lambda: a.state is ChildState.RUNNING, 5, "a running")
            assert b.pid == old_b and a.restarts == 1 and b.restarts == 0
        assert result == {"code": 0}
        assert f"a (pid {old_a}) was killed by SIGKILL" in _messages(caplog)
        assert "restart #1 in 0.1 s" in _messages(caplog)
        assert not _exists(old_a) and not _exists(old_b)
    finally:
        sup.stop()


def test_a_child_failing_again_and_again_stops_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="segments.dev")
    sup = Supervisor(FAST, poll_s=0.02)
    try:
        sup.start(CommandChild("keeper", SLEEPER))
        sup.start(CommandChild("flaky", FAILS))
        keeper = sup.child("keeper").pid
        assert keeper is not None
        assert _run_until_given_up(sup) == 1
        assert sup.failure is not None
        assert "flaky" in sup.failure and "exited with code 1" in sup.failure
        assert "failed 3 times within 60 s" in sup.failure
        assert sup.child("flaky").restarts == 2
        text = _messages(caplog)
        assert "restart #1 in 0.1 s" in text and "restart #2 in 0.1 s" in text, text
        assert _exists(keeper)  # stopping is the caller's move
    finally:
        sup.stop()
    assert not _exists(keeper)


def test_exit_code_2_is_a_configuration_error_and_stops_at_once() -> None:
    # The real CLI: an unknown SEGMENTS_* variable is exit code 2.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
    env["SEGMENTS_NO_SUCH_SETTING"] = "1"
    sup = Supervisor(FAST, poll_s=0.02)
    try:
        sup.start(CommandChild("keeper", SLEEPER))
        sup.start(CommandChild("serve", [sys.executable, "-m", "service.cli", "serve"], env=env))
        keeper = sup.child("keeper").pid
        assert _run_until_given_up(sup) == 2
        assert sup.failure is not None
        assert "serve" in sup.failure and "code 2: bad configuration" in sup.failure
        assert sup.child("serve").restarts == 0  # not restarted even once
    finally:
        sup.stop()
    assert keeper is not None and not _exists(keeper)


def test_a_killed_server_is_restarted_on_its_port(tmp_path: Path) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey", free_port(), persistent=False)
    sup = Supervisor(FAST, poll_s=0.02)
    try:
        sup.start(ServerChild(valkey))
        child = sup.child("valkey")
        old = valkey.pid
        assert old is not None
        with _supervising(sup):
            os.kill(old, signal.SIGKILL)
            _until(lambda: valkey.pid not in (None, old), 10, "valkey restarted")
            _until(lambda: child.state is ChildState.RUNNING, 10, "valkey ready")
            client = redis.Redis.from_url(valkey.url)
            try:
                assert client.ping() is True
            finally:
                client.close()
        assert not valkey.running
    finally:
        sup.stop()


def test_a_server_losing_its_data_holds_its_dependents_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's case: the consumer waits, the hook runs (retried), the API is untouched."""
    caplog.set_level(logging.INFO, logger="segments.dev")
    hook_calls: list[float] = []

    def on_restarted() -> None:
        hook_calls.append(time.monotonic())
        if len(hook_calls) == 1:
            raise RuntimeError("database not there yet")

    broker = EmbeddedBroker(tmp_path / "broker", free_port())
    sup = Supervisor(FAST, poll_s=0.02)
    try:
        sup.start(
            ServerChild(
                broker, loses_data=True, dependents=("consumer",), on_restarted=on_restarted
            )
        )
        sup.start(CommandChild("consumer", SLEEPER))
        sup.start(CommandChild("api", SLEEPER))
        consumer, api = sup.child("consumer"), sup.child("api")
        old_broker, old_consumer, old_api = broker.pid, consumer.pid, api.pid
        assert old_broker is not None and old_consumer is not None
        with _supervising(sup):
            os.kill(old_broker, signal.SIGKILL)
            _until(lambda: consumer.state is ChildState.HELD, 5, "consumer held")
            _until(lambda: not _exists(old_consumer), 5, "old consumer stopped")
            _until(lambda: consumer.pid not in (None, old_consumer), 15, "consumer restarted")
            assert broker.pid not in (None, old_broker)
            assert len(hook_calls) == 2  # failed once, retried; the consumer waited for it
            assert api.pid == old_api and api.restarts == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("broker" in m and "LOST" in m for m in errors), errors
        assert "stopping consumer" in _messages(caplog)
    finally:
        sup.stop()
