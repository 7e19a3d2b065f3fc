"""The store's connections: the pool, transactions, and which failures leave a change
undecided (``OutcomeUnknown``) and which certainly changed nothing
(``StorageUnavailable``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeAlias

import asyncpg

from service.domain.errors import OutcomeUnknown, StorageUnavailable

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# What the pool hands out: a proxy with Connection's methods, not a Connection subclass.
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # Raised when a connection lost mid-exchange is used again.
    asyncpg.InternalClientError,
)

# PostgreSQL itself aborted the statement (statement_timeout, lock_timeout): the
# transaction rolled back, so nothing changed, for certain.
ABORTED_BY_SERVER = (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)

# Long statements (COPY of a whole audience, a month's history as CSV) lift the
# session's statement_timeout for their transaction only.
BULK_TIMEOUT_S = 600.0


async def _release_as_is(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to send.

    asyncpg's default sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: one more round trip per request (a third one for a write)
    and PostgreSQL CPU (docs/performance.md).  None of it can be left over here: no SET,
    LISTEN or WITH HOLD cursor, transactions are rolled back by asyncpg before this is
    called, and the one session-level advisory lock (``PgAudienceStore.sync_session``)
    is released before its connection goes back, or the connection is terminated.  Code
    that adds session state must clean it up the same way, or put the default back.
    """


def outcome_unknown(exc: BaseException) -> OutcomeUnknown:
    return OutcomeUnknown(
        "PostgreSQL failed while the change was being committed; it may or may not be in"
        " force: retrying the same request is safe",
        {"retry_after_s": 1},
    )


@contextlib.asynccontextmanager
async def transaction_on(conn: Conn, **options: Any) -> AsyncIterator[None]:
    """A transaction on ``conn``: rolled back if the body raises, and a failure while
    committing is ``OutcomeUnknown`` (the commit may have happened)."""
    tx = conn.transaction(**options)
    await tx.start()
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                await tx.rollback()
        raise
    try:
        await tx.commit()
    except CONNECTION_ERRORS as exc:
        conn.terminate()
        raise outcome_unknown(exc) from exc


async def write_once(conn: Conn, statement: str, args: Sequence[Any]) -> Any:
    """A write that commits by itself (one statement, no transaction block): lost in
    flight, it may have committed (a statement waiting on a row lock does not notice its
    client leave).  PostgreSQL's own timeouts abort it first in the usual case."""
    try:
        return await conn.fetchval(statement, *args)
    except CONNECTION_ERRORS as exc:
        conn.terminate()
        raise outcome_unknown(exc) from exc


class PgPool:
    """The base of the store's parts: the pool, its metrics, connections and
    transactions."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float = 2.0) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        # For the pool metrics: connections handed out now, the most ever at once, and
        # callers turned away because none came free in time.
        self.in_use = 0
        self.in_use_peak = 0
        self.acquire_timeouts = 0
        self.waiting = 0  # callers in acquire() now

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        command_timeout: float = 5.0,
        acquire_timeout: float = 2.0,
    ) -> Self:
        # The server gives up before the client does: a statement PostgreSQL aborts
        # itself rolls back for certain, where a client-side timeout cannot know whether
        # the server went on to commit (a write waiting on a row lock does not notice
        # its client leaving).  The client's command_timeout stays as the backstop.
        server_timeout_ms = max(100, int(command_timeout * 1000) - 500)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                server_settings={
                    "statement_timeout": str(server_timeout_ms),
                    "lock_timeout": str(max(100, server_timeout_ms // 2)),
                    # Also end a session whose client went away mid-transaction.
                    "idle_in_transaction_session_timeout": str(10 * server_timeout_ms),
                },
                # PgBouncer-safe, and our statements are few: keep the cache small.
                statement_cache_size=256,
                reset=_release_as_is,
            )
        except CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, acquire_timeout)

    @property
    def max_size(self) -> int:
        return self._pool.get_max_size()

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self, within: float | None = None) -> AsyncIterator[Conn]:
        """A pooled connection; ``within``: the wait for one, if not the configured one."""
        self.waiting += 1
        try:
            wait = self._acquire_timeout if within is None else max(0.0, within)
            conn = await self._pool.acquire(timeout=wait)
        except TimeoutError as exc:
            self.acquire_timeouts += 1
            raise StorageUnavailable(
                "every PostgreSQL connection is busy; nothing was changed, retry shortly",
                {"retry_after_s": 1},
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise StorageUnavailable("PostgreSQL is unavailable; nothing was changed") from exc
        finally:
            self.waiting -= 1
        self.in_use += 1
        self.in_use_peak = max(self.in_use_peak, self.in_use)
        try:
            try:
                yield conn
            except (*CONNECTION_ERRORS, asyncio.CancelledError):
                # The connection may be half-way through a protocol exchange: never
                # hand it to the next caller.  (Cancelled, e.g. by a probe's timeout:
                # releasing it would first wait for the server to answer a cancel
                # request, which a frozen server never does.)
                conn.terminate()
                raise
        except CONNECTION_ERRORS as exc:
            # Before COMMIT (or in a read) a lost connection changes nothing: the server
            # rolls an unfinished transaction back.  The ambiguous cases raise
            # OutcomeUnknown themselves (transaction(), write_once()).
            raise StorageUnavailable(
                "PostgreSQL is unavailable; nothing was changed", {"retry_after_s": 1}
            ) from exc
        except ABORTED_BY_SERVER as exc:
            raise StorageUnavailable(
                "PostgreSQL did not finish in time (busy or locked); nothing was changed",
                {"retry_after_s": 1},
            ) from exc
        finally:
            self.in_use -= 1
            await self._pool.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self, *, bulk: bool = False, **options: Any) -> AsyncIterator[Conn]:
        """One transaction.  A failure while committing is ``OutcomeUnknown``: the
        commit may have happened.  ``bulk`` lifts the statement timeout for it."""
        async with self.connection() as conn, transaction_on(conn, **options):
            if bulk:
                await conn.execute(f"SET LOCAL statement_timeout = {int(BULK_TIMEOUT_S * 1000)}")
            yield conn

    async def ping(self) -> bool:
        try:
            async with self.connection() as conn:
                return bool(await conn.fetchval("SELECT 1"))
        except StorageUnavailable:
            return False
