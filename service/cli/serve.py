"""`segments serve`: the HTTP API, in one process or under a pre-fork supervisor."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time

from service.cli.processes import StopFlag, stop_children
from service.settings import Settings

log = logging.getLogger("segments")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.bootstrap import make_app
    from service.http.serving import serve

    host = args.host or settings.http_host
    port = args.port or settings.http_port
    workers = args.workers or settings.http_workers
    if workers > 1:
        return _serve_workers(workers, host, port)
    if settings.http_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # optional: the service runs on the stock loop too
            pass
    asyncio.run(
        serve(
            make_app(settings),
            host=host,
            port=port,
            keepalive_timeout=settings.http_keepalive_timeout_s,
            # Several worker processes share the port; the kernel spreads connections.
            reuse_port=args.reuse_port,
        )
    )
    return 0


def _serve_workers(workers: int, host: str, port: int) -> int:
    """A pre-fork supervisor: N `serve` processes on one port (SO_REUSEPORT).

    Each worker is a whole, stateless API process; a worker that dies is replaced.
    """
    command = [
        sys.executable, "-m", "service.cli", "serve",
        "--host", host, "--port", str(port), "--workers", "1", "--reuse-port",
    ]  # fmt: skip
    # Workers add up their metrics through one directory (prometheus-client's
    # multiprocess mode); /metrics on any worker reports all of them.
    env = dict(os.environ)
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="segments-metrics-")

    def spawn() -> subprocess.Popen[bytes]:
        # Our own interpreter and module with a fixed argv, no shell.
        return subprocess.Popen(command, env=env)  # nosec B603

    children = [spawn() for _ in range(workers)]
    stop = StopFlag()
    try:
        while not stop.requested:
            for i, child in enumerate(children):
                code = child.poll()
                if code == 2:
                    # Bad usage or configuration: another worker would fail the same way.
                    log.error("worker %d exited with 2 (configuration); stopping", child.pid)
                    return 2
                if code is not None:
                    log.warning("worker %d exited with %s; starting another", child.pid, code)
                    children[i] = spawn()
            time.sleep(0.5)
    finally:
        stop_children(children)
    return 0
