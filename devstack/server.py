"""The life cycle every embedded server shares: start, stop, kill, pause, resume.

Each server runs as a plain child process bound to 127.0.0.1, in a session of its own; an
``atexit`` hook stops whatever this process started and has not stopped yet.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from devstack.process import descendants, freeze_tree, signal_all, wait_gone

_POLL_INTERVAL = 0.05


class DevstackError(RuntimeError):
    """An embedded server failed to start, died, or did not become ready in time."""


def tail(path: Path, max_bytes: int = 4000) -> str:
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
            signal_all(tree[::-1], signal.SIGCONT)  # a paused server cannot act on SIGTERM
            signal_all([proc.pid], self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                tree = freeze_tree(proc.pid)
                signal_all(tree, signal.SIGKILL)
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
        tree = freeze_tree(proc.pid) if proc.poll() is None else []
        signal_all(tree, signal.SIGKILL)
        proc.wait()
        self._reaped(tree)

    def pause(self) -> None:
        """Freeze the server and its children (SIGSTOP): connections hang. For fault tests."""
        freeze_tree(self._require_pid())

    def resume(self) -> None:
        """Undo ``pause()`` (SIGCONT, children first)."""
        self._require_pid()
        signal_all(self.pids[::-1], signal.SIGCONT)

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
                f"{self.log_path}:\n{tail(self.log_path)}"
            )
        return False

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise DevstackError(
                f"{self.name} exited with code {code}; log {self.log_path}:\n{tail(self.log_path)}"
            )

    def _require_pid(self) -> int:
        pid = self.pid
        if pid is None:
            raise DevstackError(f"{self.name} is not running")
        return pid

    def _reaped(self, tree: list[int]) -> None:
        """Bookkeeping once the main process is reaped: wait for the rest of its tree."""
        wait_gone(tree, timeout=5)
        self._proc = None
        _LIVE.pop(id(self), None)
