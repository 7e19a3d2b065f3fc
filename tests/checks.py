"""Checks on what PostgreSQL holds, shared by tests of different layers."""

from __future__ import annotations

import asyncpg


async def replayed_history(db: asyncpg.Connection, user_id: int) -> set[str]:
    """Replay the user's history in time order, checking that each segment's rows
    alternate add/remove, and that the replay ends in the stored memberships; returns
    the slugs it ends with."""
    rows = await db.fetch(
        "SELECT slug, operation FROM membership_history WHERE user_id = $1"
        " ORDER BY occurred_at, id",
        user_id,
    )
    members: set[str] = set()
    for slug, operation in rows:
        assert (slug in members) == (operation == "remove"), (slug, operation)
        (members.add if operation == "add" else members.discard)(slug)
    stored = await db.fetch(
        "SELECT s.slug FROM memberships m JOIN segments s ON s.id = m.segment_id"
        " WHERE m.user_id = $1",
        user_id,
    )
    assert members == {r["slug"] for r in stored}
    return members
