"""A small auto-pipelining Redis client for the hot read path.

Why it exists: one redis-py asyncio call per request cost more than the framework's
whole per-request time (other clients did no better; figures in docs/performance.md).
Redis itself is not the bottleneck: the cost is the client's per-command Python
overhead (pool checkout, stream reads, per-call timeouts). One connection that writes
every command queued in an event-loop iteration with a single ``transport.write`` and
parses replies with hiredis gets most of the bare handler's throughput back.  (Commands
are now written in groups of a few, see ``_FLUSH_AT``, so that Redis works while the
API does.)

Design:
- ``asyncio.Protocol`` instead of streams: replies are parsed straight from
  ``data_received`` and resolve futures, with no reader task or buffering layer.
- Replies come back in request order (RESP guarantees it on one connection), so a FIFO
  of futures is the whole matching logic.
- Timeouts use one watchdog timer per connection instead of one timer per call. A
  timeout breaks the connection: later replies would otherwise be matched to the wrong
  callers.
- Error types are redis-py's, so callers handle both clients the same way.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis import exceptions as rexc

Arg = bytes | str | int | float

# Commands queued before they are written without waiting for the end of the loop
# iteration: writing early lets Redis start while the API still parses requests instead
# of the two taking turns, and 8 measured best (figures in docs/performance.md).
_FLUSH_AT = 8

# The few error prefixes callers may want to tell apart (subclasses of redis-py's
# ResponseError, except LOADING, which redis-py files under ConnectionError).
_ERROR_CLASSES: dict[str, type[rexc.RedisError]] = {
    "NOSCRIPT": rexc.NoScriptError,
    "LOADING": rexc.BusyLoadingError,
    "READONLY": rexc.ReadOnlyError,
    "NOAUTH": rexc.AuthenticationError,
    "WRONGPASS": rexc.AuthenticationError,
    "OOM": rexc.OutOfMemoryError,
    "NOPERM": rexc.NoPermissionError,
}


def unsupported_url(url: str) -> str | None:
    """Why this client cannot serve ``url`` (None when it can).

    It speaks plain RESP over TCP and reads only the host, port, credentials and the
    ``/db`` path of a ``redis://`` URL: it has no TLS (a ``rediss://`` URL would be served
    in clear text), no unix sockets, and ignores the options redis-py takes from the query
    string (``?db=2`` would silently read another database).  Such URLs are refused here;
    ``RedisCache.from_url`` then sends every call through redis-py, which handles them.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "rediss":
        return "rediss:// (TLS) is not supported by the pipelined client"
    if scheme == "unix":
        return "unix sockets (unix://) are not supported by the pipelined client"
    if scheme != "redis":
        return f"{scheme or 'a URL without a'}:// scheme is not supported by the pipelined client"
    if parts.query:
        return "URL options (?...) are understood by redis-py only, not the pipelined client"
    return None


def _check_url(url: str) -> None:
    reason = unsupported_url(url)
    if reason is not None:
        raise ValueError(reason)


def _error(err: rexc.ResponseError) -> rexc.RedisError:
    msg = str(err)
    cls = _ERROR_CLASSES.get(msg.split(" ", 1)[0])
    return cls(msg) if cls is not None else err


class PipelinedConnection(asyncio.Protocol):
    """One connection; commands issued in the same loop iteration share writes."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=rexc.ResponseError)
        self._out: list[bytes] = []  # encoded commands waiting for the flush
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()  # (future, deadline)
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._closed = False

    @classmethod
    async def connect(
        cls, url: str, *, timeout_s: float, password: str | None = None
    ) -> PipelinedConnection:
        """Open, authenticate, select the db and PING (so a frozen server fails here).

        Raises ``ValueError`` for a URL this client cannot serve (``unsupported_url``)."""
        _check_url(url)
        u = urlsplit(url)
        password = password if password is not None else (u.password and unquote(u.password))
        db = int(u.path.strip("/") or 0)
        self = cls(timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                await self._loop.create_connection(
                    lambda: self, u.hostname or "localhost", u.port or 6379
                )
                if password:
                    user = unquote(u.username) if u.username else None
                    await self.execute("AUTH", *([user] if user else []), password)
                if db:
                    await self.execute("SELECT", db)
                await self.execute("PING")
        except (OSError, TimeoutError) as exc:
            self.close()
            raise rexc.ConnectionError(f"cannot connect to {u.hostname}:{u.port}: {exc!r}") from exc
        except BaseException:
            self.close()
            raise
        return self

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and not self._closed

    # -- commands --------------------------------------------------------------------

    def execute(self, *args: Arg, timeout: float | None = None) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves to its (bytes-level) reply.

        A plain function returning a future (awaitable like a coroutine) saves a coroutine
        frame per call on the hot path.
        """
        fut = self._loop.create_future()
        if self._closed:
            fut.set_exception(rexc.ConnectionError("connection closed"))
            return fut
        try:
            # hiredis's stub says Tuple[X] (a 1-tuple) where it means tuple[X, ...].
            cmd = hiredis.pack_command(args)  # type: ignore[arg-type]
        except TypeError as exc:  # e.g. None or a list: what redis-py calls a DataError
            raise rexc.DataError(str(exc)) from exc
        out = self._out
        if not out:  # first command since the last write: write at the latest when the
            self._loop.call_soon(self._flush)  # loop iteration ends
        out.append(cmd)
        deadline = self._loop.time() + (self.timeout_s if timeout is None else timeout)
        self._pending.append((fut, deadline))
        if self._watchdog is None or deadline < self._watchdog_at:
            self._arm(deadline)
        if len(out) >= _FLUSH_AT:  # after the bookkeeping: the reply may come any time now
            self._flush()
        return fut

    def evalsha(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        return self.execute("EVALSHA", sha, len(keys), *keys, *args)

    def close(self) -> None:
        self._fail(rexc.ConnectionError("connection closed"))

    # -- protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as such.
        self._transport = cast(asyncio.Transport, transport)
        if self._closed:  # closed (e.g. connect timed out) while the connection was made
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        reader, pending = self._reader, self._pending
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                fut, _ = pending.popleft()
                if fut.done():  # the caller was cancelled; its reply still takes its slot
                    continue
                if type(reply) is rexc.ResponseError:
                    fut.set_exception(_error(reply))
                else:
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage or an unasked-for reply
            self._fail(rexc.ConnectionError(f"protocol error: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rexc.ConnectionError(f"connection lost: {exc!r}" if exc else "connection lost"))

    # -- internals ---------------------------------------------------------------------

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self._closed:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _arm(self, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_at = when
        self._watchdog = self._loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        # Runs about once per timeout period under steady load, so scanning is cheap.
        self._watchdog = None
        if not self._pending:
            return
        now = self._loop.time()
        earliest = min(deadline for _, deadline in self._pending)
        if earliest <= now:
            self._fail(rexc.TimeoutError("Redis reply timed out; connection closed"))
        else:
            self._arm(earliest)

    def _fail(self, exc: rexc.RedisError) -> None:
        """Break the connection for good and fail every waiting caller with ``exc``."""
        self._closed = True
        self._out.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, deque()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()


class PipelinedPool:
    """A few connections used round-robin, replaced lazily and without blocking callers.

    One connection already pipelines everything, so the default size is 1: a second one
    keeps some traffic flowing while one slot reconnects, but was slower here (two
    writes and two reads per loop iteration; bench/redis_clients.py, docs/performance.md).
    While a slot is broken its callers go to the other slots, or get ``ConnectionError``
    at once if none is up; reconnects run in the background, at most one per slot every
    100 ms.
    """

    RECONNECT_INTERVAL_S = 0.1

    def __init__(
        self, url: str, *, size: int = 1, timeout_s: float = 0.25, password: str | None = None
    ) -> None:
        _check_url(url)  # refused at once, not at the first (background) connect
        self.url, self.timeout_s, self.password = url, timeout_s, password
        self._conns: list[PipelinedConnection | None] = [None] * size
        self._last_attempt = [float("-inf")] * size
        self._tasks: list[asyncio.Task[None] | None] = [None] * size
        self._next = 0
        self._closed = False

    async def connect(self) -> None:
        """Connect every slot now; raises ConnectionError only if none could connect."""
        await asyncio.gather(*(self._reconnect(i) for i in range(len(self._conns))))
        if not any(c is not None and c.is_connected for c in self._conns):
            raise rexc.ConnectionError(f"cannot connect to {self.url}")

    def execute(self, *args: Arg, timeout: float | None = None) -> asyncio.Future[Any]:
        n = len(self._conns)
        for _ in range(n):
            i = self._next
            self._next = (i + 1) % n
            conn = self._conns[i]
            if conn is not None and conn.is_connected:
                return conn.execute(*args, timeout=timeout)
            self._maybe_reconnect(i)
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(rexc.ConnectionError(f"no connection to {self.url} (reconnecting)"))
        return fut

    def evalsha(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        return self.execute("EVALSHA", sha, len(keys), *keys, *args)

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            if task is not None:
                task.cancel()
        for conn in self._conns:
            if conn is not None:
                conn.close()

    def _maybe_reconnect(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        if self._closed or self._tasks[i] is not None:
            return
        if loop.time() - self._last_attempt[i] < self.RECONNECT_INTERVAL_S:
            return
        self._tasks[i] = loop.create_task(self._reconnect(i))

    async def _reconnect(self, i: int) -> None:
        self._last_attempt[i] = asyncio.get_running_loop().time()
        try:
            conn = await PipelinedConnection.connect(
                self.url, timeout_s=self.timeout_s, password=self.password
            )
        except rexc.RedisError:
            return  # stays broken; the next caller after the interval tries again
        finally:
            self._tasks[i] = None
        if self._closed:
            conn.close()
        else:
            old, self._conns[i] = self._conns[i], conn
            if old is not None:
                old.close()
