"""An open-loop HTTP load generator: a fixed request rate, latency from the intended send.

Closed-loop generators (wrk, Locust) wait for a response before the next request, so a
slow server slows the load down and its queueing never shows in the figures.  Here
request *i* is due at ``start + i / rate`` whatever happened before it, and its latency
runs from that intended time (as wrk2 does): time spent waiting for a free connection or
in the server's queue counts.

It speaks raw HTTP/1.1 keep-alive over a few connections (one request in flight on each;
a request due while every connection is busy waits for the first free one, and that wait
is part of its latency).  The event loop is asyncio's selector loop on ``select()``:
its timeouts have microsecond resolution, where epoll's (and uvloop's) are whole
milliseconds, which at 5,000 requests/s would add up to a millisecond of the generator's
own lateness to every latency.

The generator checks itself: ``OpenLoopResult`` gives its CPU share and how late its
timer fired against the schedule (``send_lag_*``); ``behind`` is set when it could not
keep the rate, in which case the figures are the generator's, not the server's.

    result = run_open_loop("127.0.0.1", 8080, ZipfUsers(1_000_000), rate=5000, seconds=20)
    print(result.summary())
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from bench.open_loop.generator import OpenLoop, new_loop, open_loop
from bench.open_loop.result import BEHIND_LAG_P99_S, OpenLoopResult
from bench.open_loop.traffic import PathFor, Request, WriteMix, ZipfUsers

__all__ = [
    "BEHIND_LAG_P99_S",
    "OpenLoop",
    "OpenLoopProcess",
    "OpenLoopResult",
    "PathFor",
    "Request",
    "WriteMix",
    "ZipfUsers",
    "new_loop",
    "open_loop",
    "run_open_loop",
    "start_open_loop",
]

P = ParamSpec("P")
R = TypeVar("R")


def _child_main() -> None:
    """Entry of the generator's process: a pickled ``OpenLoop`` on stdin, the pickled
    result out."""
    load = pickle.load(sys.stdin.buffer)  # nosec B301: written by our own parent
    loop = new_loop()
    try:
        out: object = loop.run_until_complete(open_loop(load))
    except Exception as exc:  # the parent re-raises it
        out = exc
    finally:
        loop.close()
    sys.stdout.buffer.write(pickle.dumps(out))
    sys.stdout.buffer.flush()


class OpenLoopProcess:
    """An open-loop run in a process of its own (no GIL shared with the caller).

    A plain subprocess rather than multiprocessing: a spawned child would re-import the
    caller's ``__main__``, which the benchmarks do not guard for that."""

    def __init__(self, load: OpenLoop) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path[1:]])}
        # Our own interpreter and module, no shell.
        self._proc = subprocess.Popen(  # nosec B603
            [sys.executable, "-c", "from bench.openloop import _child_main; _child_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(pickle.dumps(load))
        self._proc.stdin.close()
        self._proc.stdin = None  # communicate() must not flush it again

    @property
    def pid(self) -> int:
        return self._proc.pid

    def result(self, timeout: float | None = None) -> OpenLoopResult:
        try:
            out, _ = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise TimeoutError("the open-loop generator did not finish") from None
        if not out:
            raise RuntimeError(f"the open-loop generator exited {self._proc.returncode}")
        result = pickle.loads(out)  # nosec B301: our own child's output
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, OpenLoopResult)
        return result

    async def wait(self) -> OpenLoopResult:
        return await asyncio.to_thread(self.result)


def _parameters_of(params: Callable[P, object]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """The decorated function takes ``params``' parameters, for the type checker too:
    those of an ``OpenLoop``, written once there."""

    def same(function: Callable[..., R]) -> Callable[P, R]:
        return function

    return same


@_parameters_of(OpenLoop)
def start_open_loop(*args: Any, **kwargs: Any) -> OpenLoopProcess:
    """Start ``open_loop`` in a new process (``OpenLoop``'s parameters); ``.result()`` or
    ``await .wait()`` for it.

    ``path_for`` must be picklable (a module-level function or ``ZipfUsers``)."""
    return OpenLoopProcess(OpenLoop(*args, **kwargs))


@_parameters_of(OpenLoop)
def run_open_loop(*args: Any, **kwargs: Any) -> OpenLoopResult:
    """``open_loop`` in a process of its own (``OpenLoop``'s parameters), blocking until
    it is done."""
    load = OpenLoop(*args, **kwargs)
    return OpenLoopProcess(load).result(load.seconds + 60)
