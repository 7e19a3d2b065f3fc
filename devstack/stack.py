"""PostgreSQL, Valkey and the broker together under one root directory.

Run ``python -m devstack [ROOT]`` to bring the stack up in the foreground.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

from devstack.broker import EmbeddedBroker
from devstack.ports import free_port
from devstack.postgres import EmbeddedPostgres
from devstack.server import EmbeddedServer
from devstack.valkey import EmbeddedValkey


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


def main(argv: list[str] | None = None) -> int:
    """Run the stack in the foreground until Ctrl-C / SIGTERM, printing connection URLs."""
    parser = argparse.ArgumentParser(prog="python -m devstack", description=main.__doc__)
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
