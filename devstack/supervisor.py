"""Supervision: what `segments dev` (`make run`) does when one of its processes dies."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from devstack.children import Child, ChildState


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
