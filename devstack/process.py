"""Process-tree helpers for the embedded servers (psutil reads the process table).

Zombies count as gone everywhere here: they hold no resources and only wait for their
parent to reap them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

import psutil

_GONE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})
#: A process in one of these states cannot fork any more.
_FROZEN = _GONE | {psutil.STATUS_STOPPED}


def _status(pid: int) -> str | None:
    """The psutil status of ``pid``, or None once it is gone."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return None
    return status


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return _status(pid) not in (None, *_GONE)
    except psutil.AccessDenied:  # it exists, we may just not look at it
        return True


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children first, then theirs); empty once it is gone.

    Needed because PostgreSQL children call setsid(): they are neither in the postmaster's
    process group nor reachable with killpg().
    """
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found: list[int] = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() not in _GONE:
                found.append(child.pid)
    return found


def signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids`` that still exists, in order."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def freeze_tree(pid: int) -> list[int]:
    """SIGSTOP ``pid`` and then all its descendants; return them (root first).

    The root is stopped first, and we wait until it really is stopped, so that it cannot fork
    a child we would miss (PostgreSQL forks a backend per connection).
    """
    signal_all([pid], signal.SIGSTOP)
    deadline = time.monotonic() + 1
    while (status := _status(pid)) is not None and status not in _FROZEN:
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)
    tree = [pid, *descendants(pid)]
    signal_all(tree[1:], signal.SIGSTOP)
    return tree


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` is alive, or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
