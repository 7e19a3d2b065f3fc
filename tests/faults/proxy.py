"""A fault-injecting TCP proxy on loopback, for links to Redis and PostgreSQL.

This kernel has no ``tc netem``, so the tests put this between the service and a
store.  Faults apply to bytes flowing from then on, in either direction:

* ``latency_s``: every chunk waits this long before it is forwarded;
* ``stall_replies``: bytes from the server are held (not forwarded, not dropped) until
  the stall ends: a stall mid-reply, a half-open link that never answers;
* ``reset()``: every open connection is aborted (RST), as a middlebox reset does;
* ``refuse``: new connections are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.latency_s = 0.0
        self.refuse = False
        self._stall = asyncio.Event()
        self._stall.set()  # set = flowing
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.heal()
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stall_replies(self) -> None:
        self._stall.clear()

    def heal(self) -> None:
        self.latency_s = 0.0
        self.refuse = False
        self._stall.set()

    def reset(self) -> None:
        for writer in list(self._conns):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close sends RST instead of FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            writer.transport.abort()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))
        to_server = asyncio.ensure_future(self._pipe(reader, up_writer, replies=False))
        to_client = asyncio.ensure_future(self._pipe(up_reader, writer, replies=True))
        for task in (to_server, to_client):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait((to_server, to_client), return_when=asyncio.FIRST_COMPLETED)
        for task in (to_server, to_client):
            task.cancel()
        for w in (writer, up_writer):
            self._conns.discard(w)
            w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        while data := await reader.read(65536):
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if replies:
                await self._stall.wait()
            writer.write(data)
            await writer.drain()
