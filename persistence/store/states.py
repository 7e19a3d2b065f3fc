"""Reading users' states (memberships, exclusions, version) from one snapshot: one user,
a list of users, or all of them in batches (the cache rebuild)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from persistence.store.pool import Conn, PgPool
from service.domain.model import Membership, UserState

# Per user of the outer query `v`: its memberships (ids and expiries) and exclusions as
# arrays, so a batch of users is one statement rather than a query per table.
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

_STATE_OF_ONE = (
    "SELECT v.user_id, v.version, m.ids, m.exps, x.ids AS excluded"  # nosec B608
    " FROM (SELECT $1::bigint AS user_id, coalesce((SELECT version FROM user_versions"
    " WHERE user_id = $1), 0) AS version) v" + _USER_ROWS
)


# The states of a list of users with the registry's version (what Store.registry()
# answers as version), in one statement, so from one snapshot: reads answered from
# PostgreSQL need both, and come here many users a query while the cache rebuilds.
_STATES_FOR_READ = (
    "SELECT v.user_id, v.version, m.ids, m.exps, x.ids AS excluded,"  # nosec B608
    " (SELECT coalesce(max(version), 0) FROM segments) AS registry_version"
    " FROM (SELECT u.user_id, coalesce(uv.version, 0) AS version"
    " FROM unnest($1::bigint[]) AS u(user_id)"
    " LEFT JOIN user_versions uv ON uv.user_id = u.user_id) v" + _USER_ROWS
)


def _state(row: asyncpg.Record | tuple[Any, ...]) -> UserState:
    # A rebuild calls this for every user: positional unpacking and map() (C loops)
    # rather than field names and a generator.
    user_id, version, ids, exps, excluded = row
    return UserState(
        user_id,
        version,
        tuple(map(Membership, ids, exps)) if ids else (),
        frozenset(excluded) if excluded else frozenset(),
    )


class UserStates(PgPool):
    """Users' states as readers see them."""

    async def user_state(self, user_id: int) -> UserState:
        # One statement (one snapshot, so version and rows agree) and one round trip, not
        # a transaction's four: reads come here by the thousand while the cache rebuilds.
        async with self.connection() as conn:
            row = await conn.fetchrow(_STATE_OF_ONE, user_id)
        assert row is not None
        return _state(row)

    async def user_states_for_read(
        self, user_ids: Sequence[int]
    ) -> tuple[dict[int, UserState], int]:
        """The users' states (users without one are missing) and the registry's
        version, in one statement: a read answered from PostgreSQL then fetches the
        registry only when it changed."""
        async with self.connection() as conn:
            rows = await conn.fetch(_STATES_FOR_READ, list(user_ids))
        registry_version = int(rows[0][5]) if rows else 0
        return {r[0]: _state(r[:5]) for r in rows}, registry_version

    async def user_states(self, batch_size: int, after: int = 0) -> AsyncIterator[list[UserState]]:
        while True:
            # One statement per batch, so versions and rows come from one snapshot: a
            # state is never labelled with a version newer than its contents.
            async with self.connection() as conn:
                rows = await conn.fetch(_STATES_AFTER, after, batch_size)
            if not rows:
                return
            after = rows[-1]["user_id"]
            # Users with nothing too: their empty state at its version replaces a key an
            # older write left after a flush (a rebuild batch or a write-through read
            # before it), which nothing else would replace.
            yield [_state(r) for r in rows]

    async def _states(self, conn: Conn, users: Sequence[tuple[int, int]]) -> list[UserState]:
        """The states of ``(user_id, version)`` pairs, in their order, in one statement."""
        rows = await conn.fetch(
            _STATES_OF,
            [uid for uid, _ in users],
            [version for _, version in users],
        )
        return [_state(r) for r in rows]

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
