"""`segments dev` as a process: embedded stack, printed tokens, a working API, clean Ctrl-C.

Runs ``python -m service.cli dev`` fully embedded in a temp data dir (no SEGMENTS_* from
the outside), talks to the API it starts, then sends the SIGINT a terminal would.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import psutil

from service.devstack import descendants, free_port

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


def test_dev_starts_everything_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "data"
    stderr = tmp_path / "dev.stderr"
    port = free_port()
    metrics_port = _two_free_ports()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SEGMENTS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env |= {
        "SEGMENTS_DATA_DIR": str(data),
        "SEGMENTS_HTTP_PORT": str(port),
        "SEGMENTS_LOG_JSON": "false",
        # The consumer takes this port, the reconciler the next one.
        "SEGMENTS_METRICS_PORT": str(metrics_port),
    }
    tree: set[int] = set()
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
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
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
