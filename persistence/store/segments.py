"""The segments registry: creating, changing and deleting segments, with their history
rows, under the registry lock."""

from __future__ import annotations

import datetime as dt

import asyncpg

from persistence.store.pool import Conn, PgPool
from service.domain.errors import SegmentExists, SegmentNotFound
from service.domain.model import Registry, RegistryEntry, Segment

# Serialises segment (registry) changes, so registry versions commit in order and a
# reader that sees version N sees every change up to N.
REGISTRY_LOCK = 0x5E6_0001

# Interpolated into SQL (hence the B608 exemptions): a constant, never input; values
# always go as $n parameters.  Bandit also warns "no failed test" on some of those
# f-strings: a known false alarm (PyCQA/bandit#1204), the exemption is still needed.
_SEGMENT_COLUMNS = "id, slug, description, auto_bp, created_at"


def _segment(row: asyncpg.Record) -> Segment:
    return Segment(
        id=row["id"],
        slug=row["slug"],
        description=row["description"],
        auto_bp=row["auto_bp"],
        created_at=row["created_at"],
    )


class SegmentTables(PgPool):
    """The segments and their history rows."""

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
            old, at = await _lock_live(conn, slug)
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
            old, at = await _lock_live(conn, slug)
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


async def _lock_live(conn: Conn, slug: str) -> tuple[asyncpg.Record, dt.datetime]:
    """Lock the live segment ``slug`` (its id and rule) for a change, and take the
    change's time.  The registry lock, then the row lock, then the time: a change of a
    user naming this segment that committed before us is stamped before it (it held the
    row FOR SHARE)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
    old = await conn.fetchrow(
        "SELECT id, auto_bp FROM segments WHERE slug = $1 AND deleted_at IS NULL FOR UPDATE",
        slug,
    )
    if old is None:
        raise SegmentNotFound(f"segment {slug!r} does not exist", {"slugs": [slug]})
    at: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
    return old, at
