"""The PostgreSQL store: the source of truth.

Queries are SQL run on asyncpg directly: the tables are defined once in
``persistence/tables.py`` (SQLAlchemy Core, for the migrations), while the hot write
path avoids SQLAlchemy's per-statement compile and result-processing overhead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from service.domain.changes import SegmentRef, plan_change
from service.domain.errors import SegmentExists, SegmentNotFound, StorageUnavailable
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

# Interpolated into SQL (hence the B608 exemptions): a constant, never input; values
# always go as $n parameters.  Bandit also warns "no failed test" on some of those
# f-strings: a known false alarm (PyCQA/bandit#1204), the exemption is still needed.
_SEGMENT_COLUMNS = "id, slug, description, auto_bp, created_at"


def _ts(epoch: float | None) -> dt.datetime | None:
    if epoch is None or epoch == NEVER:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _epoch(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


# Per user of the outer query `v`: its memberships (ids and expiries) and exclusions as
# arrays.  One statement per batch of users, measured 2x faster than a query per table.
_USER_ROWS = """
    LEFT JOIN LATERAL (
        SELECT array_agg(segment_id) AS ids,
               array_agg(extract(epoch FROM expires_at)::float8) AS exps
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


def _state(row: asyncpg.Record) -> UserState:
    return UserState(
        row["user_id"],
        row["version"],
        tuple(
            Membership(sid, NEVER if exp is None else exp)
            for sid, exp in zip(row["ids"] or (), row["exps"] or (), strict=True)
        ),
        frozenset(row["excluded"] or ()),
    )


def _segment(row: asyncpg.Record) -> Segment:
    return Segment(
        id=row["id"],
        slug=row["slug"],
        description=row["description"],
        auto_bp=row["auto_bp"],
        created_at=row["created_at"],
    )


class PgStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(
        cls, url: str, *, min_size: int = 2, max_size: int = 20, command_timeout: float = 5.0
    ) -> PgStore:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                # PgBouncer-safe, and our statements are few: keep the cache small.
                statement_cache_size=256,
            )
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        try:
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except _CONNECTION_ERRORS:
                    # The connection may be half-way through a protocol exchange: never
                    # hand it to the next caller.
                    conn.terminate()
                    raise
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable("PostgreSQL is unavailable; nothing was changed") from exc

    @contextlib.asynccontextmanager
    async def transaction(self, **options: Any) -> AsyncIterator[Conn]:
        async with self.connection() as conn, conn.transaction(**options):
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
                row = await conn.fetchrow(
                    "INSERT INTO segments (slug, description, auto_bp, version)"
                    " VALUES ($1, $2, $3, nextval('change_id_seq'))"
                    f" RETURNING {_SEGMENT_COLUMNS}",  # nosec B608
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
        """Change a live segment's description and/or percentage rule."""
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
            row = await conn.fetchrow(
                "UPDATE segments SET"
                " description = coalesce($2, description),"
                " auto_bp = CASE WHEN $3 THEN $4 ELSE auto_bp END,"
                " version = nextval('change_id_seq')"
                " WHERE slug = $1 AND deleted_at IS NULL"
                f" RETURNING {_SEGMENT_COLUMNS}",  # nosec B608
                slug,
                description,
                set_auto,
                auto_bp,
            )
        if row is None:
            raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
        return _segment(row)

    async def delete_segment(self, slug: str) -> Segment:
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
            row = await conn.fetchrow(
                "UPDATE segments SET deleted_at = now(), version = nextval('change_id_seq')"
                " WHERE slug = $1 AND deleted_at IS NULL"
                f" RETURNING {_SEGMENT_COLUMNS}",  # nosec B608
                slug,
            )
            if row is None:
                raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
            # One `remove` per member at deletion time; a membership that had already
            # expired (but was not swept yet) ends at its expiry instead.
            await conn.execute(
                """
                INSERT INTO membership_history
                    (occurred_at, user_id, segment_id, slug, operation, cause)
                SELECT CASE WHEN expires_at <= now() THEN expires_at ELSE now() END,
                       user_id, segment_id, $2, 'remove',
                       CASE WHEN expires_at <= now() THEN 'expiry' ELSE 'segment_deleted' END
                FROM memberships WHERE segment_id = $1
                """,
                row["id"],
                slug,
            )
            await conn.execute("DELETE FROM memberships WHERE segment_id = $1", row["id"])
            await conn.execute("DELETE FROM auto_exclusions WHERE segment_id = $1", row["id"])
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
        uid = change.user_id
        slugs = [a.slug for a in change.add] + list(change.remove)
        async with self.transaction() as conn:
            # The user's version row is the lock that serialises changes of one user;
            # the version is drawn after the lock, so it grows in commit order.
            # The outbox row commits with the change: if the process dies before Redis
            # is written, the reconciler still finds the change.
            lock = await conn.fetchrow(
                """
                WITH v AS (
                    INSERT INTO user_versions (user_id, version)
                    VALUES ($1, nextval('change_id_seq'))
                    ON CONFLICT (user_id) DO UPDATE SET version = nextval('change_id_seq')
                    RETURNING version
                ), o AS (
                    INSERT INTO cache_outbox (change_id, user_id) SELECT version, $1 FROM v
                )
                SELECT version, extract(epoch FROM now())::float8 AS now,
                       (SELECT coalesce(max(version), 0) FROM segments) AS registry_version
                FROM v
                """,
                uid,
            )
            assert lock is not None
            # One read after the lock: the named live segments (FOR SHARE: a concurrent
            # delete of one waits for us, or we for it and then see it deleted) and all
            # of the user's rows.  Five round trips per change instead of eleven: the
            # write benchmark measured 36% of the API's CPU in asyncpg's execute.
            rows = await conn.fetch(
                """
                WITH s AS (
                    SELECT id, slug, auto_bp FROM segments
                    WHERE slug = ANY($2::text[]) AND deleted_at IS NULL FOR SHARE)
                SELECT 0 AS kind, id, slug, auto_bp, NULL::float8 AS exp FROM s
                UNION ALL
                SELECT 1, segment_id, NULL, NULL, extract(epoch FROM expires_at)::float8
                FROM memberships WHERE user_id = $1
                UNION ALL
                SELECT 2, segment_id, NULL, NULL, NULL FROM auto_exclusions WHERE user_id = $1
                """,
                uid,
                slugs,
            )
            found: dict[str, SegmentRef] = {}
            current: dict[int, float | None] = {}
            excluded: set[int] = set()
            for r in rows:
                if r["kind"] == 0:
                    found[r["slug"]] = SegmentRef(r["id"], r["slug"], r["auto_bp"])
                elif r["kind"] == 1:
                    current[r["id"]] = r["exp"]
                else:
                    excluded.add(r["id"])
            unknown = sorted(set(slugs) - set(found))
            if unknown:
                raise SegmentNotFound("unknown segment(s); nothing was changed", {"slugs": unknown})
            plan = plan_change(change, expiries, found, current, frozenset(excluded), lock["now"])
            events = plan.events
            # Every write of the change in one statement (data-modifying CTEs).
            await conn.execute(
                """
                WITH up AS (
                    INSERT INTO memberships (user_id, segment_id, expires_at)
                    SELECT $1, s, e FROM unnest($2::bigint[], $3::timestamptz[]) AS t(s, e)
                    ON CONFLICT (user_id, segment_id)
                    DO UPDATE SET expires_at = EXCLUDED.expires_at, created_at = now()
                ), del AS (
                    DELETE FROM memberships
                    WHERE user_id = $1 AND segment_id = ANY($4::bigint[])
                ), ex AS (
                    INSERT INTO auto_exclusions (user_id, segment_id)
                    SELECT $1, unnest($5::bigint[]) ON CONFLICT DO NOTHING
                ), unex AS (
                    DELETE FROM auto_exclusions
                    WHERE user_id = $1 AND segment_id = ANY($6::bigint[])
                )
                INSERT INTO membership_history
                    (occurred_at, user_id, segment_id, slug, operation, cause)
                SELECT t.at, $1, t.sid, t.slug, t.op, t.cause
                FROM unnest($7::timestamptz[], $8::bigint[], $9::text[], $10::text[],
                            $11::text[]) AS t(at, sid, slug, op, cause)
                """,
                uid,
                [sid for sid, _ in plan.upsert],
                [_ts(exp) for _, exp in plan.upsert],
                plan.delete,
                plan.exclude,
                plan.unexclude,
                [_ts(e.occurred_at) for e in events],
                [e.segment_id for e in events],
                [e.slug for e in events],
                [e.operation for e in events],
                [e.cause for e in events],
            )
        # The state after the change, from what was read under the lock plus the plan.
        for sid, exp in plan.upsert:
            current[sid] = exp
        for sid in plan.delete:
            current.pop(sid, None)
        excluded.update(plan.exclude)
        excluded.difference_update(plan.unexclude)
        state = UserState(
            uid,
            lock["version"],
            tuple(Membership(sid, NEVER if exp is None else exp) for sid, exp in current.items()),
            frozenset(excluded),
        )
        return AppliedChange(state, lock["registry_version"])

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
                    (occurred_at, user_id, segment_id, slug, operation, cause)
                SELECT e.expires_at, e.user_id, e.segment_id, s.slug, 'remove', 'expiry'
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
    ) -> None:
        """Stream events in [start, end), ordered by time, as ``;``-separated CSV rows.

        PostgreSQL formats the CSV itself (COPY ... TO STDOUT) and asyncpg hands each
        chunk to ``sink`` as it arrives, so memory stays flat however large the month
        is, and the range on the partition key reads only that month's partition.
        Measured on 1,000,000 rows (bench/report_history.py): a cursor with CSV
        formatting in Python took 4.6 s, 10x the ceiling; COPY runs near the ceiling.
        Segment cells starting with one of ``formula_starts`` get a leading apostrophe.
        """
        user_filter = "" if user_id is None else " AND user_id = $4"
        query = (
            "SELECT user_id,"
            " CASE WHEN left(slug, 1) = ANY($3::text[]) THEN '''' || slug ELSE slug END,"
            " operation,"
            " to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            " FROM membership_history"
            # user_filter is one of two constant strings; the id itself is $4.
            f" WHERE occurred_at >= $1 AND occurred_at < $2{user_filter}"  # nosec B608
            " ORDER BY occurred_at, id"
        )
        args: list[Any] = [start, end, list(formula_starts)]
        if user_id is not None:
            args.append(user_id)

        async def write(chunk: bytes) -> None:  # asyncpg wants a coroutine function
            await sink(chunk)

        async with self.connection() as conn:
            await conn.copy_from_query(query, *args, output=write, format="csv", delimiter=";")
