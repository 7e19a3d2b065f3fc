"""PostgreSQL's bytes on disk: the user data's tables and indexes, a history partition."""

from __future__ import annotations

import datetime as dt

import asyncpg


async def pg_sizes(url: str) -> dict[str, int]:
    """Bytes on disk: the database, and each table (heap) and index of the user data."""
    conn = await asyncpg.connect(url)
    try:
        sizes = {"database": await conn.fetchval("SELECT pg_database_size(current_database())")}
        for table in ("memberships", "user_versions"):
            sizes[f"{table} (heap)"] = await conn.fetchval("SELECT pg_relation_size($1)", table)
            for row in await conn.fetch(
                "SELECT indexname, pg_relation_size(indexname::regclass) AS size"
                " FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
                table,
            ):
                sizes[f"  {row['indexname']}"] = row["size"]
        return sizes
    finally:
        await conn.close()


async def history_partition_size(url: str, start: dt.datetime) -> tuple[str, int, int]:
    """(partition, heap bytes, index bytes) of membership_history for ``start``'s month."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT c.relname, pg_relation_size(c.oid) AS heap,"
            " pg_indexes_size(c.oid) AS idx"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'membership_history'::regclass"
            " ORDER BY pg_relation_size(c.oid) DESC LIMIT 1"
        )
        assert row is not None
        return row["relname"], row["heap"], row["idx"]
    finally:
        await conn.close()
