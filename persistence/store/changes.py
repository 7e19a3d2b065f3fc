"""A change of one user's memberships (``apply_change``): read, plan (the domain's
``plan_change``) and write as a compare-and-set, the user's changes in this process
taking turns."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from persistence.store.pool import Conn, PgPool, transaction_on, write_once
from service.domain.changes import SegmentRef, plan_change
from service.domain.errors import SegmentNotFound, StorageUnavailable
from service.domain.model import NEVER, AppliedChange, Membership, UserChange, UserState

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
# $a, $b, ... (numbered when composed).  Only the parts a change needs are sent, since
# PostgreSQL spends CPU on empty parts too (at most 32 prepared texts).
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


@dataclass(slots=True)
class _Turn:
    """The changes of one user in this process: ``lock`` is held by the one applying,
    ``holders`` counts it and those waiting (the entry goes when none are left)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holders: int = 0


class MembershipChanges(PgPool):
    """Changes of users' memberships."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float = 2.0) -> None:
        super().__init__(pool, acquire_timeout)
        # For the write-contention metric: optimistic attempts that found the user
        # changed since their read, and changes that then took the user's row lock.
        self.change_conflicts = 0
        self.locked_changes = 0
        self.turn_timeouts = 0  # changes refused: the user's turn did not come in time
        self._turns: dict[int, _Turn] = {}

    async def apply_change(
        self, change: UserChange, expiries: Sequence[float | None]
    ) -> AppliedChange:
        # Optimistic first: one read, then one statement that writes everything if the
        # user's version and the named segments are still what the read saw (a
        # compare-and-set under the user's row lock): two round trips instead of five
        # (BEGIN, lock, read, write, COMMIT).  A user changed concurrently fails the
        # compare and is read again; after OPTIMISTIC_TRIES the change takes the user's
        # row lock first, so a hot user cannot starve a writer.
        #
        # In this process a user's changes take turns before they take a connection:
        # concurrent ones would only fail each other's compare and queue on the row
        # lock, each holding a pooled connection, so one hot user could take the whole
        # pool from every other request.  Waiting for the turn and then for a connection
        # together stay within the acquire timeout.
        deadline = time.monotonic() + self._acquire_timeout
        async with (
            self._user_turn(change.user_id, deadline),
            self.connection(deadline - time.monotonic()) as conn,
        ):
            for _ in range(OPTIMISTIC_TRIES):
                applied = await self._try_change(conn, change, expiries, locked=False)
                if applied is not None:
                    return applied
                self.change_conflicts += 1
            self.locked_changes += 1
            async with transaction_on(conn):
                await conn.execute(_LOCK_USER, change.user_id)
                applied = await self._try_change(conn, change, expiries, locked=True)
                # Under both locks (the user's row; FOR SHARE on its segments) the
                # compare cannot fail.
                assert applied is not None
            return applied

    @contextlib.asynccontextmanager
    async def _user_turn(self, user_id: int, deadline: float) -> AsyncIterator[None]:
        """This process's changes of ``user_id`` one at a time, in arrival order."""
        turn = self._turns.get(user_id)
        if turn is None:
            turn = self._turns[user_id] = _Turn()
        turn.holders += 1
        try:
            if turn.holders > 1:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await turn.lock.acquire()
                except TimeoutError as exc:
                    self.turn_timeouts += 1
                    raise StorageUnavailable(
                        "this user's earlier changes are still being applied; nothing was"
                        " changed, retry shortly",
                        {"retry_after_s": 1},
                    ) from exc
            else:
                await turn.lock.acquire()
            try:
                yield
            finally:
                turn.lock.release()
        finally:
            turn.holders -= 1
            if not turn.holders:
                del self._turns[user_id]

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
            new_version = await write_once(conn, _write_statement(key), args)
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
