"""What the commands share for running processes: signals, child processes and the
metrics endpoint of processes without an HTTP API."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable

from service.settings import Settings


def serve_metrics(settings: Settings, process: str) -> None:
    """A Prometheus endpoint for the processes that do not serve HTTP themselves, with
    the families of their kind (``service.observability.FAMILIES``)."""
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from service.observability import registry

        start_http_server(
            settings.metrics_port, addr=settings.http_host, registry=registry(process)
        )


def stop_children(children: list[subprocess.Popen[bytes]], timeout_s: float = 15) -> None:
    """SIGTERM every child (they finish in-flight work), then SIGKILL the stragglers."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class StopFlag:
    """Whether SIGINT or SIGTERM has arrived (``requested``), for a supervisor that polls
    its children: it then stops them in order.  Making one installs the handlers."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._request)
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, *_: object) -> None:
        self.requested = True


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGINT/SIGTERM set ``stop`` so it can finish cleanly."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(run())
