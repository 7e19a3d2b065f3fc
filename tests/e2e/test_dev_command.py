"""`segments dev` as a process: embedded stack, printed tokens, a working API, clean Ctrl-C,
and its supervisor: a child that dies is restarted alone, a child that keeps failing stops all.

Runs ``python -m service.cli dev`` fully embedded in a temp data dir (no SEGMENTS_* from
the outside), talks to the API it starts, kills its children, then sends the SIGINT a
terminal would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiokafka import AIOKafkaProducer

from devstack import descendants, free_port
from service.ingest.messages import AudienceMessage, encode
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "Press Ctrl-C"
START_WITHIN_S = 120
API_UP_WITHIN_S = 15
EXIT_WITHIN_S = 60
TOKEN_LINE = re.compile(r"^\s+(\w+)\s+(\S+)\s+scopes: (.+)$")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no stderr file)"


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    # Keep draining after the banner: the children inherit this pipe, and a full pipe
    # would block them.
    for raw in stream:
        lines.put(raw.decode(errors="replace"))
    lines.put(None)


def _read_banner(
    proc: subprocess.Popen[bytes], lines: queue.Queue[str | None], stderr: Path
) -> list[str]:
    """stdout lines up to and including the "Press Ctrl-C" one (bounded wait)."""
    seen: list[str] = []
    deadline = time.monotonic() + START_WITHIN_S
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {READY_LINE!r} within {START_WITHIN_S} s:\n{_tail(stderr)}"
        try:
            line = lines.get(timeout=min(left, 1))
        except queue.Empty:
            continue
        assert line is not None, (
            f"stdout closed (exit {proc.poll()}) before the banner:\n{''.join(seen)}\n"
            f"{_tail(stderr)}"
        )
        seen.append(line)
        if READY_LINE in line:
            return seen


def _call(
    method: str, url: str, body: object | None = None, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def _first_get(url: str, proc: subprocess.Popen[bytes], stderr: Path) -> tuple[int, Any]:
    """The API child may still be binding its port after the banner: retry, bounded."""
    deadline = time.monotonic() + API_UP_WITHIN_S
    while True:
        assert proc.poll() is None, f"dev exited ({proc.returncode}):\n{_tail(stderr)}"
        try:
            status, body = _call("GET", url)
            if status < 500 or time.monotonic() > deadline:
                return status, body
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, (
                f"API not answering within {API_UP_WITHIN_S} s:\n{_tail(stderr)}"
            )
        time.sleep(0.1)


def _two_free_ports() -> int:
    """A port whose next one is free too."""
    for _ in range(20):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two consecutive free ports")


def _first_text(url: str, proc: subprocess.Popen[bytes], stderr: Path) -> tuple[int, str]:
    """A process's metrics server may still be starting: retry, bounded."""
    deadline = time.monotonic() + API_UP_WITHIN_S
    while True:
        assert proc.poll() is None, f"dev exited ({proc.returncode}):\n{_tail(stderr)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
                if "segments_" in text or time.monotonic() > deadline:
                    return resp.status, text
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"{url} not answering:\n{_tail(stderr)}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    # A zombie (say, a PostgreSQL backend reparented to init) holds nothing: it counts as gone.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_everything(proc: subprocess.Popen[bytes], tree: set[int]) -> None:
    """Last resort when the test failed: nothing of ours may outlive it."""
    tree |= set(descendants(proc.pid))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(EXIT_WITHIN_S)
    # Children and servers run in sessions of their own: the group kill cannot reach them.
    for pid in tree:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _launch(
    data: Path, stderr: Path, settings: dict[str, str]
) -> tuple[subprocess.Popen[bytes], queue.Queue[str | None]]:
    """``segments dev`` with only ``settings`` (and its data dir) from the environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SEGMENTS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env |= {"SEGMENTS_DATA_DIR": str(data), "SEGMENTS_LOG_JSON": "false", **settings}
    with stderr.open("wb") as err:
        proc = subprocess.Popen(  # our own module, fixed argv
            [sys.executable, "-m", "service.cli", "dev"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            # Its own group, as a shell gives a foreground job: killpg is then Ctrl-C.
            start_new_session=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def test_dev_starts_everything_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "data"
    stderr = tmp_path / "dev.stderr"
    port = free_port()
    metrics_port = _two_free_ports()
    tree: set[int] = set()
    proc, lines = _launch(
        data,
        stderr,
        {
            "SEGMENTS_HTTP_PORT": str(port),
            # The consumer takes this port, the reconciler the next one.
            "SEGMENTS_METRICS_PORT": str(metrics_port),
        },
    )
    try:
        banner = _read_banner(proc, lines, stderr)
        text = "".join(banner)

        # 1. The banner: API URL on our port, and the tokens kept in dev-tokens.json.
        base = f"http://127.0.0.1:{port}"
        assert f"user-segments is up: {base}/docs" in text, text
        printed = {
            m[1]: (m[2], m[3].split(", "))
            for line in banner
            if (m := TOKEN_LINE.match(line.rstrip("\n")))
        }
        token_file = data / "dev-tokens.json"
        stored = json.loads(token_file.read_text())
        assert printed == {n: (t["token"], t["scopes"]) for n, t in stored.items()}, text
        assert f"export TOKEN={stored['dev']['token']}" in text
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = stored["dev"]["token"]
        # The settings for another shell: `source var/dev.env` (as the banner says).
        dev_env = data / "dev.env"
        assert f"source {dev_env}" in text, text
        assert stat.S_IMODE(dev_env.stat().st_mode) == 0o600
        sourced = subprocess.run(
            ["bash", "-c", f"source {dev_env} && env"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        exported = dict(line.split("=", 1) for line in sourced.splitlines() if "=" in line)
        assert exported["TOKEN"] == token
        for name in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP", "CP_URL"):
            assert f"SEGMENTS_{name}={exported['SEGMENTS_' + name]}" in text, name

        # 2. The API: open reads, token-guarded writes, and the write is visible.
        status, body = _first_get(f"{base}/v1/users/1/segments", proc, stderr)
        assert status == 200, (status, body, _tail(stderr))
        assert _call("POST", f"{base}/v1/segments", {"slug": "DEV_TEST"})[0] == 401
        status, body = _call("POST", f"{base}/v1/segments", {"slug": "DEV_TEST"}, token)
        assert status == 201, body
        status, body = _call("POST", f"{base}/v1/users/1/segments", {"add": ["DEV_TEST"]}, token)
        assert status == 200, body
        status, body = _call("GET", f"{base}/v1/users/1/segments")
        assert status == 200 and "DEV_TEST" in body["segments"], body

        # The consumer's and the reconciler's metrics, on ports of their own.
        for at, metric in ((metrics_port, "kafka"), (metrics_port + 1, "cache_complete")):
            status, text_ = _first_text(f"http://127.0.0.1:{at}/metrics", proc, stderr)
            assert status == 200 and f"segments_{metric}" in text_, (at, text_[:500])

        # 3. Ctrl-C: the terminal signals the foreground group; children and servers are
        # in sessions of their own, so only the supervisor gets it and stops them.
        tree = set(descendants(proc.pid))
        assert len(tree) >= 7, tree  # 3 servers + serve, reconcile, consume, cp-emulator
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dev still running {EXIT_WITHIN_S} s after SIGINT") from None
        took = time.monotonic() - started
        assert code == 0, f"exit {code} after {took:.1f} s:\n{_tail(stderr)}"
        left = sorted(pid for pid in tree if _alive(pid))
        assert not left, [psutil.Process(p).cmdline() for p in left if _alive(p)]
    finally:
        _kill_everything(proc, tree)


# -- the supervisor: a child that dies is restarted alone ----------------------------------------

TOPIC = Settings().kafka_topic
MERCHANT = 9001
#: How `segments dev` names its children: the CLI command, or the embedded server.
SERVER_BINARIES = (("postgres", "postgres"), ("valkey", "valkey-server"), ("broker", "tansu"))


def _role(cmdline: list[str]) -> str | None:
    if cmdline[1:3] == ["-m", "service.cli"] and len(cmdline) > 3:
        return cmdline[3]
    exe = Path(cmdline[0].split()[0]).name if cmdline and cmdline[0] else ""
    return next((role for role, prefix in SERVER_BINARIES if exe.startswith(prefix)), None)


def _still_running(process: psutil.Process) -> bool:
    """Alive and the same process (psutil compares the start time: pids get reused)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Dev:
    proc: subprocess.Popen[bytes]
    stderr: Path
    base: str
    token: str = ""
    bootstrap: str = ""
    #: Every process seen under it, restarted ones too: none may outlive it.
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def children(self) -> dict[str, psutil.Process]:
        """Its live children by role: serve, consume, ..., postgres, valkey, broker."""
        self.assert_running()
        top = psutil.Process(self.proc.pid)
        found: dict[str, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in top.children(recursive=True):
                self.seen.setdefault(process.pid, process)
        for child in top.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                role = _role(child.cmdline())
                if role is not None and _still_running(child):
                    found[role] = child
        return found

    def pid(self, role: str) -> int | None:
        child = self.children().get(role)
        return None if child is None else child.pid

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"dev exited ({self.proc.returncode}):\n{self.log()}"

    def log(self) -> str:
        """The end of its stderr, for failure messages."""
        return _tail(self.stderr)

    def logged(self, text: str) -> bool:
        return text in self.stderr.read_text(errors="replace")

    def assert_api_answers(self) -> None:
        status, body = _call("GET", f"{self.base}/v1/users/1/segments")
        assert status == 200, (status, body)

    def wait_restarted(
        self, role: str, old: int, within_s: float, meanwhile: Callable[[], None] | None = None
    ) -> psutil.Process:
        """The new process of ``role`` once it replaced ``old``; ``meanwhile()`` each round."""
        deadline = time.monotonic() + within_s
        while True:
            child = self.children().get(role)
            if child is not None and child.pid != old:
                return child
            if meanwhile is not None:
                meanwhile()
            assert time.monotonic() < deadline, (
                f"{role} not restarted within {within_s} s:\n{self.log()}"
            )
            time.sleep(0.1)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """One `segments dev` for the crash tests; at the end, Ctrl-C must still stop it all."""
    tmp = tmp_path_factory.mktemp("dev-supervised")
    data, stderr, port = tmp / "data", tmp / "dev.stderr", free_port()
    proc, lines = _launch(data, stderr, {"SEGMENTS_HTTP_PORT": str(port)})
    running = Dev(proc, stderr, f"http://127.0.0.1:{port}")
    try:
        banner = "".join(_read_banner(proc, lines, stderr))
        found = re.search(r"SEGMENTS_KAFKA_BOOTSTRAP=(\S+)", banner)
        assert found is not None, banner
        running.bootstrap = found[1]
        running.token = json.loads((data / "dev-tokens.json").read_text())["dev"]["token"]
        status, body = _first_get(f"{running.base}/v1/users/1/segments", proc, stderr)
        assert status == 200, (status, body, _tail(stderr))
        assert set(running.children()) >= {"postgres", "valkey", "broker", "serve", "consume"}
        yield running

        running.children()  # note the latest processes
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(EXIT_WITHIN_S)
        assert code == 0, f"exit {code} after SIGINT:\n{_tail(stderr)}"
        left = [p for p in running.seen.values() if _still_running(p)]
        assert not left, [p.cmdline() for p in left if _still_running(p)]
    finally:
        _kill_everything(proc, set(running.seen))


def _publish(bootstrap: str, segment_type: str, changes: list[tuple[str, list[int]]]) -> None:
    """Publish audience changes, each acknowledged by the broker (acks=all)."""

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for op, ids in changes:
                message = AudienceMessage(
                    merchant_id=MERCHANT,
                    segment_type=segment_type,
                    op=op,  # type: ignore[arg-type]
                    customer_ids=ids,
                    batch_id=uuid.uuid4().hex,
                )
                key, value = encode(message)
                await producer.send_and_wait(TOPIC, value=value, key=key)
        finally:
            await producer.stop()

    asyncio.run(asyncio.wait_for(publish(), 30))


def _wait_customers(dev: Dev, segment_type: str, expected: int, within_s: float) -> None:
    """Poll the audience until it has ``expected`` customers; the API must answer meanwhile."""
    url = f"{dev.base}/v1/merchants/{MERCHANT}/segments/{segment_type}"
    deadline = time.monotonic() + within_s
    while True:
        status, body = _call("GET", url, token=dev.token)
        assert status in (200, 404), (status, body)
        got = body["customers"] if status == 200 else None
        if got == expected:
            return
        dev.assert_running()
        dev.assert_api_answers()
        assert time.monotonic() < deadline, (
            f"{got} customers, not {expected}, within {within_s} s:\n{dev.log()}"
        )
        time.sleep(0.2)


def test_a_killed_consumer_is_restarted_and_no_acknowledged_message_is_lost(dev: Dev) -> None:
    segment = "SUPERVISED_CONSUMER"
    before = dev.children()
    consumer, broker = before["consume"], before["broker"]
    _publish(dev.bootstrap, segment, [("replace", [1])])
    _wait_customers(dev, segment, 1, 45)

    os.kill(consumer.pid, signal.SIGKILL)
    # Acknowledged by the broker while no consumer runs: the broker must keep them.
    _publish(dev.bootstrap, segment, [("add", [i]) for i in range(2, 22)])
    dev.wait_restarted("consume", consumer.pid, 15, dev.assert_api_answers)
    _wait_customers(dev, segment, 21, 45)
    _publish(dev.bootstrap, segment, [("add", [22])])
    _wait_customers(dev, segment, 22, 30)

    after = dev.children()
    assert _still_running(broker) and after["broker"].pid == broker.pid  # never restarted
    assert {r: p.pid for r, p in after.items() if r != "consume"} == {
        r: p.pid for r, p in before.items() if r != "consume"
    }
    assert dev.logged(f"consume (pid {consumer.pid}) was killed by SIGKILL"), dev.log()


def test_a_killed_api_is_restarted_and_answers_again(dev: Dev) -> None:
    before = dev.children()
    api = before["serve"]
    os.kill(api.pid, signal.SIGKILL)
    dev.wait_restarted("serve", api.pid, 15)
    status, body = _first_get(f"{dev.base}/v1/users/1/segments", dev.proc, dev.stderr)
    assert status == 200, (status, body, dev.log())
    after = dev.children()
    assert {r: p.pid for r, p in after.items() if r != "serve"} == {
        r: p.pid for r, p in before.items() if r != "serve"
    }
    assert dev.logged(f"serve (pid {api.pid}) was killed by SIGKILL"), dev.log()


def test_a_killed_valkey_is_restarted_and_reads_keep_answering(dev: Dev) -> None:
    slug, user = "SUPERVISED_VALKEY", 7001
    status, body = _call("POST", f"{dev.base}/v1/segments", {"slug": slug}, dev.token)
    assert status == 201, body
    url = f"{dev.base}/v1/users/{user}/segments"
    status, body = _call("POST", url, {"add": [slug]}, dev.token)
    assert status == 200, body

    def read_ok() -> None:
        status, body = _call("GET", url)
        assert status == 200 and slug in body["segments"], (status, body)

    read_ok()
    before = dev.children()
    valkey = before["valkey"]
    address = valkey.cmdline()[0].split()[-1]  # valkey-server shows "host:port" as its title
    os.kill(valkey.pid, signal.SIGKILL)
    # While it is down and while its copy is rebuilt, reads come from PostgreSQL.
    restarted = dev.wait_restarted("valkey", valkey.pid, 15, read_ok)
    assert restarted.cmdline()[0].split()[-1] == address  # the same port
    deadline = time.monotonic() + 30
    # /readyz is 200 "degraded" while the copy is rebuilt (reads come from PostgreSQL):
    # the rebuild is over when it says "ready".
    while (ready := _call("GET", f"{dev.base}/readyz"))[1].get("status") != "ready":
        assert ready[0] == 200, ready  # PostgreSQL answers: never out of rotation
        read_ok()
        assert time.monotonic() < deadline, f"cache not rebuilt: {ready}\n{dev.log()}"
        time.sleep(0.2)
    read_ok()
    after = dev.children()
    for role in ("postgres", "broker", "serve", "consume"):
        assert after[role].pid == before[role].pid, role


def test_a_killed_postgres_is_restarted_and_writes_work_again(dev: Dev) -> None:
    slug, user = "SUPERVISED_POSTGRES", 7002
    status, body = _call("POST", f"{dev.base}/v1/segments", {"slug": slug}, dev.token)
    assert status == 201, body
    before = dev.children()
    postgres = before["postgres"]
    os.kill(postgres.pid, signal.SIGKILL)  # the postmaster: a crash of the server
    dev.wait_restarted("postgres", postgres.pid, 30)
    url = f"{dev.base}/v1/users/{user}/segments"
    deadline = time.monotonic() + 30
    while (status := _call("POST", url, {"add": [slug]}, dev.token)[0]) != 200:
        assert status >= 500, status  # 503 storage_unavailable until the pool reconnects
        assert time.monotonic() < deadline, f"writes not back within 30 s ({status}):\n{dev.log()}"
        time.sleep(0.2)
    status, body = _call("GET", url)
    assert status == 200 and slug in body["segments"], (status, body)
    assert dev.children()["broker"].pid == before["broker"].pid


def test_a_child_that_keeps_failing_stops_dev_with_an_error(tmp_path: Path) -> None:
    """The reconciler cannot bind its metrics port: restarted with backoff, then everything
    stops with exit code 1 and a message naming it."""
    stderr = tmp_path / "dev.stderr"
    metrics_port = _two_free_ports()
    seen: dict[int, psutil.Process] = {}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port + 1))  # the reconciler's port
        taken.listen()
        proc, _ = _launch(
            tmp_path / "data",
            stderr,
            {"SEGMENTS_HTTP_PORT": str(free_port()), "SEGMENTS_METRICS_PORT": str(metrics_port)},
        )
        try:
            # 0.5 + 1 + 2 + 4 s of backoff between five failures, after the start-up.
            deadline = time.monotonic() + START_WITHIN_S + 60
            while proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        seen.setdefault(child.pid, child)
                assert time.monotonic() < deadline, f"dev still running:\n{_tail(stderr)}"
                time.sleep(0.2)
            text = stderr.read_text(errors="replace")
            assert proc.returncode == 1, f"exit {proc.returncode}:\n{_tail(stderr)}"
            assert "restart #4" in text, _tail(stderr)
            assert "failed 5 times within 60 s" in text, _tail(stderr)
            last = text.strip().splitlines()[-1]
            assert "reconcile (pid" in text and "segments dev: stopped" in text, last
            roles = {_role(p.cmdline()) for p in seen.values() if _still_running(p)}
            assert not roles, roles
            left = [p for p in seen.values() if _still_running(p)]
            assert not left, left
        finally:
            _kill_everything(proc, set(seen))
