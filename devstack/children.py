"""The processes a :class:`~devstack.supervisor.Supervisor` keeps running: commands and
embedded servers."""

from __future__ import annotations

import enum
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from devstack.server import EmbeddedServer


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
