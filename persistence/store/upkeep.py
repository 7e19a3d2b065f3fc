"""The reconciler's work in PostgreSQL: ending expired memberships, draining the cache
outbox, scanning versions, and creating history partitions ahead of time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from persistence.store.states import UserStates
from service.domain.model import UserState


class Upkeep(UserStates):
    """Expiry, the outbox and the version scan."""

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

    async def ensure_history_partitions(self, months_ahead: int = 3) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "SELECT ensure_history_partition("
                "(date_trunc('month', now()) + make_interval(months => m))::date)"
                " FROM generate_series(0, $1) AS m",
                months_ahead,
            )
