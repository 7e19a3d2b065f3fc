"""The PostgreSQL store: the source of truth.

Queries are SQL run on asyncpg directly: the tables are defined once in
``persistence/tables.py`` (SQLAlchemy Core, for the migrations), while the hot write
path avoids SQLAlchemy's per-statement compile and result-processing overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from persistence import history
from service.domain.changes import SegmentRef, plan_change
from service.domain.errors import (
    OutcomeUnknown,
    SegmentExists,
    SegmentNotFound,
    StorageUnavailable,
)
from service.domain.history import ExplainInputs
from service.domain.model import (
    NEVER,
    AppliedChange,
    Membership,
    Registry,
    RegistryEntry,
    Segment,
    UserChange,
    UserState,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# What the pool hands out: a proxy with Connection's methods, not a Connection subclass.
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# Serialises segment (registry) changes, so registry versions commit in order and a
# reader that sees version N sees every change up to N.
REGISTRY_LOCK = 0x5E6_0001

_CONNECTION_ERRORS = (
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
_ABORTED_BY_SERVER = (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)

# Long statements (COPY of a whole audience, a month's history as CSV) lift the
# session's statement_timeout for their transaction only.
BULK_TIMEOUT_S = 600.0

# Interpolated into SQL (hence the B608 exemptions): a constant, never input; values
# always go as $n parameters.  Bandit also warns "no failed test" on some of those
# f-strings: a known false alarm (PyCQA/bandit#1204), the exemption is still needed.
_SEGMENT_COLUMNS = "id, slug, description, auto_bp, created_at"


def _epoch(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


# Per user of the outer query `v`: its memberships (ids and expiries) and exclusions as
# arrays.  One statement per batch of users, measured 2x faster than a query per table.
_USER_ROWS = """
    LEFT JOIN LATERAL (
        SELECT array_agg(segment_id) AS ids,
               -- No expiry reads as +Infinity (model.NEVER): rows become Memberships
               -- with a plain map() (_state).
               array_agg(coalesce(extract(epoch FROM expires_at)::float8, 'Infinity'))
                   AS exps
        FROM memberships WHERE user_id = v.user_id) m ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(segment_id) AS ids
        FROM auto_exclusions WHERE user_id = v.user_id) x ON true
"""

# Constant text only: every value is a $n parameter.
_STATES_AFTER = (
    "SELECT v.user_id, v.version, m.ids, m.exps, x.ids AS excluded"  # nosec B608
    " FROM (SELECT user_id, version FROM user_versions WHERE user_id > $1"
    " ORDER BY user_id LIMIT $2) v" + _USER_ROWS + " ORDER BY v.user_id"
)
_STATES_OF = (
    "SELECT v.user_id, v.version, m.ids, m.exps, x.ids AS excluded"  # nosec B608
    " FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS v(user_id, version, n)"
    + _USER_ROWS
    + " ORDER BY v.n"
)


# -- a change of one user's memberships (apply_change) -----------------------------------

# Optimistic attempts before a change takes the user's row lock up front.
OPTIMISTIC_TRIES = 2

# Everything a change needs, in one statement: the named live segments (kind 0, with
# their version), the user's memberships (1) and exclusions (2), and one row (3) with
# the user's version, the registry version and the time of the change.  {lock} is
# empty, or FOR SHARE when the user's row is already locked (then the write below
# cannot fail).  The time is clock_timestamp(), taken after the snapshot: later than
# the commit of the user's previous change, so history sorted by time replays in commit
# order (now() would be the time the transaction began, before any wait for the lock).
_READ_TEMPLATE = """
    WITH s AS (
        SELECT id, slug, auto_bp, version FROM segments
        WHERE slug = ANY($2::text[]) AND deleted_at IS NULL{lock})
    SELECT 0 AS kind, id, slug, auto_bp, version AS n, NULL::float8 AS exp FROM s
    UNION ALL
    SELECT 1, segment_id, NULL, NULL, NULL, extract(epoch FROM expires_at)::float8
    FROM memberships WHERE user_id = $1
    UNION ALL
    SELECT 2, segment_id, NULL, NULL, NULL, NULL FROM auto_exclusions WHERE user_id = $1
    UNION ALL
    SELECT 3, coalesce((SELECT version FROM user_versions WHERE user_id = $1), 0), NULL, NULL,
           (SELECT coalesce(max(version), 0) FROM segments),
           extract(epoch FROM clock_timestamp())::float8
"""
_READ = _READ_TEMPLATE.format(lock="")
_READ_LOCKED = _READ_TEMPLATE.format(lock=" FOR SHARE")

# The user's row lock for the pessimistic path; a new user's row is created with version
# 0 (it rolls back with the transaction if the change fails).
_LOCK_USER = (
    "INSERT INTO user_versions (user_id, version) VALUES ($1, 0)"
    " ON CONFLICT (user_id) DO UPDATE SET version = user_versions.version"
)

# The write, as one statement (data-modifying CTEs: one implicit transaction).  It
# writes only if every named segment is still live at the version read ($2, $3: FOR
# SHARE, so a concurrent delete waits for us or we see it) and the user's version is
# still $4 (checked on the locked row by ON CONFLICT DO UPDATE; the new version is drawn
# under that lock, so it grows in commit order per user).  Every other part writes only
# if that row was written: the result is the new version, or no row and nothing written.
# The outbox row commits with the change: if the process dies before Redis is written,
# the reconciler still finds the change.
_WRITE_HEAD = """
    WITH s AS (
        SELECT s.id FROM segments s
        JOIN unnest($2::bigint[], $3::bigint[]) AS t(id, version)
            ON s.id = t.id AND s.version = t.version
        WHERE s.deleted_at IS NULL FOR SHARE OF s
    ), v AS (
        INSERT INTO user_versions (user_id, version)
        SELECT $1, nextval('change_id_seq')
        WHERE (SELECT count(*) FROM s) = cardinality($2::bigint[])
        ON CONFLICT (user_id) DO UPDATE SET version = nextval('change_id_seq')
        WHERE user_versions.version = $4
        RETURNING version
    ), o AS (
        INSERT INTO cache_outbox (change_id, user_id) SELECT version, $1 FROM v
    )"""
# The optional parts, in the order of ChangePlan's lists, with their parameters as
# $a, $b, ... (numbered when composed).  Only the parts a change needs are sent: with
# all five every time, PostgreSQL spent about 20% more CPU per change on the empty ones
# (0.40 against 0.32 ms a change, 16 concurrent writers; at most 32 prepared texts).
_WRITE_PARTS = (
    (
        """, up AS (
        INSERT INTO memberships (user_id, segment_id, expires_at)
        SELECT $1, t.s, to_timestamp(t.e) FROM unnest($a::bigint[], $b::float8[]) AS t(s, e)
        WHERE EXISTS (SELECT FROM v)
        ON CONFLICT (user_id, segment_id)
        DO UPDATE SET expires_at = EXCLUDED.expires_at, created_at = now()
    )""",
        2,
    ),
    (
        """, del AS (
        DELETE FROM memberships
        WHERE user_id = $1 AND segment_id = ANY($a::bigint[]) AND EXISTS (SELECT FROM v)
    )""",
        1,
    ),
    (
        """, ex AS (
        INSERT INTO auto_exclusions (user_id, segment_id)
        SELECT $1, x FROM unnest($a::bigint[]) AS x WHERE EXISTS (SELECT FROM v)
        ON CONFLICT DO NOTHING
    )""",
        1,
    ),
    (
        """, unex AS (
        DELETE FROM auto_exclusions
        WHERE user_id = $1 AND segment_id = ANY($a::bigint[]) AND EXISTS (SELECT FROM v)
    )""",
        1,
    ),
    (
        """, h AS (
        INSERT INTO membership_history
            (occurred_at, user_id, segment_id, slug, operation, cause, kind, expires_at)
        SELECT to_timestamp(t.at), $1, t.sid, t.slug, t.op, t.cause, t.kind, to_timestamp(t.exp)
        FROM unnest($a::float8[], $b::bigint[], $c::text[], $d::text[], $e::text[],
                    $f::text[], $g::float8[])
            AS t(at, sid, slug, op, cause, kind, exp)
        WHERE EXISTS (SELECT FROM v)
    )""",
        7,
    ),
)
_WRITES: dict[tuple[bool, ...], str] = {}


def _write_statement(present: tuple[bool, ...]) -> str:
    """The write statement with the parts ``present`` marks (one flag per part)."""
    text = _WRITES.get(present)
    if text is None:
        out = [_WRITE_HEAD]
        n = 5  # $1..$4 are the head's
        for wanted, (part, count) in zip(present, _WRITE_PARTS, strict=True):
            if wanted:
                for letter in "abcdefg"[:count]:
                    part = part.replace(f"${letter}", f"${n}")
                    n += 1
                out.append(part)
        out.append("\n    SELECT version FROM v")
        text = _WRITES[present] = "".join(out)
    return text


def _state(row: asyncpg.Record) -> UserState:
    # A rebuild calls this for every user: positional unpacking and map() (C loops)
    # rather than field names and a generator.
    user_id, version, ids, exps, excluded = row
    return UserState(
        user_id,
        version,
        tuple(map(Membership, ids, exps)) if ids else (),
        frozenset(excluded) if excluded else frozenset(),
    )


def _segment(row: asyncpg.Record) -> Segment:
    return Segment(
        id=row["id"],
        slug=row["slug"],
        description=row["description"],
        auto_bp=row["auto_bp"],
        created_at=row["created_at"],
    )


async def _release_as_is(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to send.

    asyncpg's default sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: one more round trip per request (a third one for a write)
    and 40 us of PostgreSQL CPU (measured).  None of it can be left over here: no SET,
    LISTEN or WITH HOLD cursor, transactions are rolled back by asyncpg before this is
    called, and the one session-level advisory lock (``PgAudienceStore.sync_session``)
    is released before its connection goes back, or the connection is terminated.  Code
    that adds session state must clean it up the same way, or put the default back.
    """


def _unknown(exc: BaseException) -> OutcomeUnknown:
    return OutcomeUnknown(
        "PostgreSQL failed while the change was being committed; it may or may not be in"
        " force: retrying the same request is safe",
        {"retry_after_s": 1},
    )


@contextlib.asynccontextmanager
async def _transaction_on(conn: Conn, **options: Any) -> AsyncIterator[None]:
    """A transaction on ``conn``: rolled back if the body raises, and a failure while
    committing is ``OutcomeUnknown`` (the commit may have happened)."""
    tx = conn.transaction(**options)
    await tx.start()
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            with contextlib.suppress(*_CONNECTION_ERRORS, asyncpg.PostgresError):
                await tx.rollback()
        raise
    try:
        await tx.commit()
    except _CONNECTION_ERRORS as exc:
        conn.terminate()
        raise _unknown(exc) from exc


async def _write_once(conn: Conn, statement: str, args: Sequence[Any]) -> Any:
    """A write that commits by itself (one statement, no transaction block): lost in
    flight, it may have committed (a statement waiting on a row lock does not notice its
    client leave).  PostgreSQL's own timeouts abort it first in the usual case."""
    try:
        return await conn.fetchval(statement, *args)
    except _CONNECTION_ERRORS as exc:
        conn.terminate()
        raise _unknown(exc) from exc


class PgStore:
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
    ) -> PgStore:
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
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, acquire_timeout)

    @property
    def max_size(self) -> int:
        return self._pool.get_max_size()

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        self.waiting += 1
        try:
            conn = await self._pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError as exc:
            self.acquire_timeouts += 1
            raise StorageUnavailable(
                "every PostgreSQL connection is busy; nothing was changed, retry shortly",
                {"retry_after_s": 1},
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable("PostgreSQL is unavailable; nothing was changed") from exc
        finally:
            self.waiting -= 1
        self.in_use += 1
        self.in_use_peak = max(self.in_use_peak, self.in_use)
        try:
            try:
                yield conn
            except (*_CONNECTION_ERRORS, asyncio.CancelledError):
                # The connection may be half-way through a protocol exchange: never
                # hand it to the next caller.  (Cancelled, e.g. by a probe's timeout:
                # releasing it would first wait for the server to answer a cancel
                # request, which a frozen server never does.)
                conn.terminate()
                raise
        except _CONNECTION_ERRORS as exc:
            # Before COMMIT (or in a read) a lost connection changes nothing: the server
            # rolls an unfinished transaction back.  The ambiguous cases raise
            # OutcomeUnknown themselves (transaction(), _write_once()).
            raise StorageUnavailable(
                "PostgreSQL is unavailable; nothing was changed", {"retry_after_s": 1}
            ) from exc
        except _ABORTED_BY_SERVER as exc:
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
        async with self.connection() as conn, _transaction_on(conn, **options):
            if bulk:
                await conn.execute(f"SET LOCAL statement_timeout = {int(BULK_TIMEOUT_S * 1000)}")
            yield conn

    async def ping(self) -> bool:
        try:
            async with self.connection() as conn:
                return bool(await conn.fetchval("SELECT 1"))
        except StorageUnavailable:
            return False

    # -- segments -------------------------------------------------------------

    async def create_segment(self, slug: str, description: str, auto_bp: int | None) -> Segment:
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
            try:
                # With its first segment_history row (its rule as created), stamped
                # after the registry lock: segment changes are stamped in commit order.
                row = await conn.fetchrow(
                    "WITH s AS ("
                    " INSERT INTO segments (slug, description, auto_bp, version)"
                    " VALUES ($1, $2, $3, nextval('change_id_seq'))"
                    f" RETURNING {_SEGMENT_COLUMNS}"  # nosec B608
                    "), h AS ("
                    " INSERT INTO segment_history"
                    " (segment_id, slug, occurred_at, operation, new_bp)"
                    " SELECT id, slug, clock_timestamp(), 'created', auto_bp FROM s)"
                    " SELECT * FROM s",
                    slug,
                    description,
                    auto_bp,
                )
            except asyncpg.UniqueViolationError:
                raise SegmentExists(f"segment {slug!r} already exists", {"slug": slug}) from None
        assert row is not None
        return _segment(row)

    async def list_segments(self) -> list[Segment]:
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_SEGMENT_COLUMNS} FROM segments"  # nosec B608
                " WHERE deleted_at IS NULL ORDER BY slug"
            )
        return [_segment(r) for r in rows]

    async def get_segment(self, slug: str) -> Segment | None:
        async with self.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_SEGMENT_COLUMNS} FROM segments"  # nosec B608
                " WHERE slug = $1 AND deleted_at IS NULL",
                slug,
            )
        return None if row is None else _segment(row)

    async def update_segment(
        self, slug: str, *, description: str | None, auto_bp: int | None, set_auto: bool
    ) -> Segment:
        """Change a live segment's description and/or percentage rule; a rule that
        changes gets a ``rule_changed`` row in segment_history, in the same transaction."""
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
            # The row lock first, then the time: a change of a user naming this segment
            # that committed before us is stamped before it (it held the row FOR SHARE).
            old = await conn.fetchrow(
                "SELECT id, auto_bp FROM segments"
                " WHERE slug = $1 AND deleted_at IS NULL FOR UPDATE",
                slug,
            )
            if old is None:
                raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
            at = await conn.fetchval("SELECT clock_timestamp()")
            row = await conn.fetchrow(
                "UPDATE segments SET"
                " description = coalesce($2, description),"
                " auto_bp = CASE WHEN $3 THEN $4 ELSE auto_bp END,"
                " version = nextval('change_id_seq')"
                " WHERE id = $1"
                f" RETURNING {_SEGMENT_COLUMNS}",  # nosec B608
                old["id"],
                description,
                set_auto,
                auto_bp,
            )
            assert row is not None
            if set_auto and old["auto_bp"] != auto_bp:
                await conn.execute(
                    "INSERT INTO segment_history"
                    " (segment_id, slug, occurred_at, operation, old_bp, new_bp)"
                    " VALUES ($1, $2, $3, 'rule_changed', $4, $5)",
                    old["id"],
                    slug,
                    at,
                    old["auto_bp"],
                    auto_bp,
                )
        return _segment(row)

    async def delete_segment(self, slug: str) -> Segment:
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
            # The row lock first, then the time (as in update_segment).
            old = await conn.fetchrow(
                "SELECT id, auto_bp FROM segments"
                " WHERE slug = $1 AND deleted_at IS NULL FOR UPDATE",
                slug,
            )
            if old is None:
                raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
            at = await conn.fetchval("SELECT clock_timestamp()")
            sid = old["id"]
            row = await conn.fetchrow(
                "UPDATE segments SET deleted_at = $2, version = nextval('change_id_seq')"
                f" WHERE id = $1 RETURNING {_SEGMENT_COLUMNS}",  # nosec B608
                sid,
                at,
            )
            assert row is not None
            # Every membership and exclusion ends, as facts: a membership that had
            # already expired (but was not swept yet) ends at its expiry instead.
            await conn.execute(
                """
                INSERT INTO membership_history
                    (occurred_at, user_id, segment_id, slug, operation, cause, kind)
                SELECT CASE WHEN expires_at <= $3 THEN expires_at ELSE $3 END,
                       user_id, segment_id, $2, 'remove',
                       CASE WHEN expires_at <= $3 THEN 'expiry' ELSE 'segment_deleted' END,
                       'member'
                FROM memberships WHERE segment_id = $1
                UNION ALL
                SELECT $3, user_id, segment_id, $2, 'add', 'segment_deleted', 'exclusion'
                FROM auto_exclusions WHERE segment_id = $1
                """,
                sid,
                slug,
                at,
            )
            await conn.execute(
                "INSERT INTO segment_history (segment_id, slug, occurred_at, operation, old_bp)"
                " VALUES ($1, $2, $3, 'deleted', $4)",
                sid,
                slug,
                at,
                old["auto_bp"],
            )
            await conn.execute("DELETE FROM memberships WHERE segment_id = $1", sid)
            await conn.execute("DELETE FROM auto_exclusions WHERE segment_id = $1", sid)
        return _segment(row)

    async def registry(self) -> Registry:
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT id, slug, auto_bp, deleted_at IS NULL AS live, version FROM segments"
            )
        return Registry(
            version=max((r["version"] for r in rows), default=0),
            segments={r["id"]: RegistryEntry(r["slug"], r["auto_bp"]) for r in rows if r["live"]},
        )

    # -- memberships ----------------------------------------------------------

    async def apply_change(
        self, change: UserChange, expiries: Sequence[float | None]
    ) -> AppliedChange:
        # Optimistic first: one read, then one statement that writes everything if the
        # user's version and the named segments are still what the read saw (a
        # compare-and-set under the user's row lock).  Two round trips instead of five
        # (BEGIN, lock, read, write, COMMIT): bench/writes.py went from 1,695-1,778 to
        # 2,375-2,599 req/s (0.23x to 0.31-0.32x of its ceiling), with the pool's reset
        # query gone too.  A user changed concurrently fails the compare and is read
        # again; after OPTIMISTIC_TRIES the change takes the user's row lock first, so
        # a hot user cannot starve a writer.
        async with self.connection() as conn:
            for _ in range(OPTIMISTIC_TRIES):
                applied = await self._try_change(conn, change, expiries, locked=False)
                if applied is not None:
                    return applied
            async with _transaction_on(conn):
                await conn.execute(_LOCK_USER, change.user_id)
                applied = await self._try_change(conn, change, expiries, locked=True)
                # Under both locks (the user's row; FOR SHARE on its segments) the
                # compare cannot fail.
                assert applied is not None
            return applied

    async def _try_change(
        self, conn: Conn, change: UserChange, expiries: Sequence[float | None], *, locked: bool
    ) -> AppliedChange | None:
        """Read, plan and write ``change``; None if the user or one of the named segments
        changed between the read and the write (nothing was written then)."""
        uid = change.user_id
        slugs = [a.slug for a in change.add]
        slugs += change.remove
        rows = await conn.fetch(_READ_LOCKED if locked else _READ, uid, slugs)
        found: dict[str, SegmentRef] = {}
        seg_ids: list[int] = []
        seg_versions: list[int] = []
        current: dict[int, float | None] = {}
        excluded: set[int] = set()
        version = registry_version = 0
        now = 0.0
        for kind, id_, slug, auto_bp, n, exp in rows:
            if kind == 0:
                found[slug] = SegmentRef(id_, slug, auto_bp)
                seg_ids.append(id_)
                seg_versions.append(n)
            elif kind == 1:
                current[id_] = exp
            elif kind == 2:
                excluded.add(id_)
            else:
                version, registry_version, now = id_, n, exp
        if len(found) != len(slugs):
            unknown = sorted(set(slugs) - set(found))
            raise SegmentNotFound("unknown segment(s); nothing was changed", {"slugs": unknown})
        plan = plan_change(change, expiries, found, current, frozenset(excluded), now)
        args: list[Any] = [uid, seg_ids, seg_versions, version]
        if plan.upsert:
            args.append([sid for sid, _ in plan.upsert])
            args.append([exp for _, exp in plan.upsert])
        if plan.delete:
            args.append(plan.delete)
        if plan.exclude:
            args.append(plan.exclude)
        if plan.unexclude:
            args.append(plan.unexclude)
        events = plan.events
        if events:
            args.append([e.occurred_at for e in events])
            args.append([e.segment_id for e in events])
            args.append([e.slug for e in events])
            args.append([e.operation for e in events])
            args.append([e.cause for e in events])
            args.append([e.kind for e in events])
            args.append([e.expires_at for e in events])
        key = (
            bool(plan.upsert),
            bool(plan.delete),
            bool(plan.exclude),
            bool(plan.unexclude),
            bool(events),
        )
        if locked:
            new_version = await conn.fetchval(_write_statement(key), *args)
        else:
            new_version = await _write_once(conn, _write_statement(key), args)
        if new_version is None:
            return None
        # The state after the change, from what was read plus the plan.
        for sid, exp in plan.upsert:
            current[sid] = exp
        for sid in plan.delete:
            current.pop(sid, None)
        excluded.update(plan.exclude)
        excluded.difference_update(plan.unexclude)
        state = UserState(
            uid,
            new_version,
            tuple(Membership(sid, NEVER if exp is None else exp) for sid, exp in current.items()),
            frozenset(excluded),
        )
        return AppliedChange(state, registry_version)

    async def user_state(self, user_id: int) -> UserState:
        async with self.transaction(isolation="repeatable_read", readonly=True) as conn:
            version = await conn.fetchval(
                "SELECT version FROM user_versions WHERE user_id = $1", user_id
            )
            return (await self._states(conn, [(user_id, version or 0)]))[0]

    async def user_states(self, batch_size: int) -> AsyncIterator[list[UserState]]:
        after = 0
        while True:
            # One statement per batch, so versions and rows come from one snapshot: a
            # state is never labelled with a version newer than its contents.
            async with self.connection() as conn:
                rows = await conn.fetch(_STATES_AFTER, after, batch_size)
            if not rows:
                return
            after = rows[-1]["user_id"]
            states = [_state(r) for r in rows if r["ids"] or r["excluded"]]
            if states:
                yield states

    async def _states(self, conn: Conn, users: Sequence[tuple[int, int]]) -> list[UserState]:
        """The states of ``(user_id, version)`` pairs, in their order, in one statement."""
        rows = await conn.fetch(
            _STATES_OF,
            [uid for uid, _ in users],
            [version for _, version in users],
        )
        return [_state(r) for r in rows]

    # -- expiry ---------------------------------------------------------------

    async def sweep_expired(self, limit: int) -> list[UserState]:
        """End up to ``limit`` users' expired memberships, logging each at its expiry time.

        Users are locked in id order with SKIP LOCKED, the same lock a change takes
        first, so several sweepers (and the API) never block or deadlock each other,
        and a membership is ended exactly once.  Returns the users' new states.
        """
        async with self.transaction() as conn:
            users = await conn.fetch(
                """
                SELECT v.user_id FROM user_versions v
                WHERE v.user_id IN (
                    SELECT DISTINCT user_id FROM memberships
                    WHERE expires_at <= now() LIMIT $1)
                ORDER BY v.user_id FOR UPDATE SKIP LOCKED
                """,
                limit,
            )
            if not users:
                return []
            ids = [r["user_id"] for r in users]
            await conn.execute(
                """
                WITH ended AS (
                    DELETE FROM memberships m
                    WHERE m.user_id = ANY($1::bigint[]) AND m.expires_at <= now()
                    RETURNING m.user_id, m.segment_id, m.expires_at
                )
                INSERT INTO membership_history
                    (occurred_at, user_id, segment_id, slug, operation, cause, kind)
                SELECT e.expires_at, e.user_id, e.segment_id, s.slug, 'remove', 'expiry', 'member'
                FROM ended e JOIN segments s ON s.id = e.segment_id
                """,
                ids,
            )
            rows = await conn.fetch(
                """
                WITH v AS (
                    UPDATE user_versions SET version = nextval('change_id_seq')
                    WHERE user_id = ANY($1::bigint[]) RETURNING user_id, version
                ), o AS (
                    INSERT INTO cache_outbox (change_id, user_id) SELECT version, user_id FROM v
                )
                SELECT user_id, version FROM v
                """,
                ids,
            )
            return await self._states(conn, [(r["user_id"], r["version"]) for r in rows])

    # -- reconciliation -------------------------------------------------------

    async def drain_outbox(
        self,
        limit: int,
        min_age_s: float,
        apply: Callable[[list[UserState]], Awaitable[None]],
    ) -> int:
        """Hand the states of users with outbox rows older than ``min_age_s`` to ``apply``
        (the cache write) and delete those rows only if it succeeds.

        Rows younger than ``min_age_s`` are left to the API's own write-through.  SKIP
        LOCKED lets several reconcilers drain side by side.
        """
        async with self.transaction() as conn:
            rows = await conn.fetch(
                """
                DELETE FROM cache_outbox WHERE change_id IN (
                    SELECT change_id FROM cache_outbox
                    WHERE created_at < now() - make_interval(secs => $2)
                    ORDER BY change_id LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING user_id
                """,
                limit,
                min_age_s,
            )
            if not rows:
                return 0
            users = sorted({r["user_id"] for r in rows})
            await apply(await self._current_states(conn, users))
        return len(rows)

    async def scan_versions(self, after_user_id: int, limit: int) -> list[tuple[int, int, bool]]:
        """(user_id, version, has live memberships or exclusions), by user id."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                """
                SELECT v.user_id, v.version,
                       EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = v.user_id
                               AND (m.expires_at IS NULL OR m.expires_at > now()))
                    OR EXISTS (SELECT 1 FROM auto_exclusions x WHERE x.user_id = v.user_id)
                    AS live
                FROM user_versions v WHERE v.user_id > $1 ORDER BY v.user_id LIMIT $2
                """,
                after_user_id,
                limit,
            )
        return [(r[0], r[1], r[2]) for r in rows]

    async def user_states_of(self, user_ids: Sequence[int]) -> list[UserState]:
        async with self.transaction(isolation="repeatable_read", readonly=True) as conn:
            return await self._current_states(conn, user_ids)

    async def _current_states(self, conn: Conn, user_ids: Sequence[int]) -> list[UserState]:
        # Versions first: a state may be newer than its label, never older.
        rows = await conn.fetch(
            "SELECT user_id, version FROM user_versions WHERE user_id = ANY($1::bigint[])",
            list(user_ids),
        )
        return await self._states(conn, [(r["user_id"], r["version"]) for r in rows])

    async def ensure_history_partitions(self, months_ahead: int = 3) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "SELECT ensure_history_partition("
                "(date_trunc('month', now()) + make_interval(months => m))::date)"
                " FROM generate_series(0, $1) AS m",
                months_ahead,
            )

    # -- history --------------------------------------------------------------

    async def history_csv(
        self,
        start: dt.datetime,
        end: dt.datetime,
        user_id: int | None,
        formula_starts: Sequence[str],
        sink: Callable[[bytes], Awaitable[None]],
        labels: tuple[str, str] = ("add", "remove"),
    ) -> None:
        """Stream what readers saw in [start, end) as ``;``-separated CSV rows, in time
        order.

        Derived from the stored facts and the segments' history (persistence/history.py)
        in one snapshot: rule segments are derived user batch by user batch (replayed
        pairs to a temporary table, rule-class rows set aside in a spool), PostgreSQL
        formats and orders everything else (COPY ... TO STDOUT) with a marker at each
        rule change, and each chunk goes to ``sink`` as it arrives with the set-aside
        rows written in place of the markers, so memory stays flat however large the
        month is.  Measured on 1,000,000 rows (bench/report_history.py): a cursor with
        CSV formatting in Python took 4.6 s, 10x the ceiling.  Segment cells
        starting with one of ``formula_starts`` get a leading apostrophe; ``labels``
        name the operations add and remove.
        """
        # Not read-only: the derived rows go through temporary tables.
        async with self.transaction(bulk=True, isolation="repeatable_read") as conn:
            # The final sort of a month in memory (about 40 MB per parallel process in
            # bench/report_history.py); larger ones spill to disk.
            await conn.execute(f"SET LOCAL work_mem = '{history.REPORT_WORK_MEM}'")
            await history.write_csv(
                conn,
                start,
                end,
                user_id,
                formula_starts,
                labels,
                sink,
                copy_timeout_s=BULK_TIMEOUT_S,
            )

    async def explain_inputs(self, user_id: int) -> ExplainInputs:
        """What explaining a user's segments needs, from one snapshot."""
        async with self.transaction(isolation="repeatable_read", readonly=True) as conn:
            segments = await conn.fetch(
                "SELECT id, slug, auto_bp FROM segments WHERE deleted_at IS NULL ORDER BY slug"
            )
            version = await conn.fetchval(
                "SELECT version FROM user_versions WHERE user_id = $1", user_id
            )
            state = (await self._states(conn, [(user_id, version or 0)]))[0]
            last = await history.last_transitions(conn, user_id)
            now = await history.now_us(conn)
        return ExplainInputs(
            user_id=user_id,
            segments=[(r["id"], r["slug"], r["auto_bp"]) for r in segments],
            memberships={m.segment_id: m.expires_at for m in state.memberships},
            excluded=state.excluded,
            last={sid: (at / 1e6, add) for sid, (at, add) in last.items()},
            now=now / 1e6,
        )
