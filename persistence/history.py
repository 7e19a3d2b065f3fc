"""History reports from PostgreSQL: stored facts and segment rules -> what readers saw.

The derivation itself is pure (``service/domain/history.py``); this module reads what
it needs and lets PostgreSQL format and order the CSV (``COPY ... TO STDOUT``), in one
repeatable-read snapshot:

1. Segments whose rule includes anyone during the period ("rule segments") need the
   derivation.  Users are taken in id batches (memory stays flat): their facts in
   those segments from the period's start on and their current rows are read, each
   pair with explicit state is replayed (``transitions``), and every other user gets
   the rule's rows by bucket class (``rule_classes``): every *known* user (a row in
   ``user_versions``) for a month-wide report, the one user of a per-user report,
   seen or not.  What is derived goes to temporary tables by binary COPY: a row per
   change for replayed pairs, a (user, class) per user otherwise.
2. For every other segment a reader's view is the explicit state alone, so its rows
   are the stored facts (memberships beginning and ending) and the expiries not swept
   yet.  One ``COPY (...) TO STDOUT`` merges those with the derived rows in time
   order; PostgreSQL spills to disk what does not fit in ``work_mem``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from itertools import compress, filterfalse
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from service.domain.history import (
    NEVER_US,
    RuleClasses,
    Timeline,
    buckets,
    initial_state,
    rule_classes,
    transitions,
)
from service.domain.rules import BUCKETS, USER_ID_MAX, bucket

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# Known users per batch of a month-wide report: bounds the memory of a batch (their
# ids, what is derived for them).
REPORT_BATCH = 100_000

# work_mem of a report's transaction: its final sort.
REPORT_WORK_MEM = "128MB"

# A derived row: (user_id, segment_id, add, at in microseconds).
DerivedRow: TypeAlias = tuple[int, int, bool, int]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _us(column: str) -> str:
    """A timestamptz column as integer microseconds since the epoch (exact)."""
    return f"(extract(epoch FROM {column}) * 1000000)::int8"


def to_us(value: dt.datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=value)


# Constant text only (hence the B608 exemptions): every value is a $n parameter.
_TIMELINES = (
    f"SELECT segment_id, slug, {_us('occurred_at')}, operation, new_bp"  # nosec B608
    " FROM segment_history ORDER BY segment_id, occurred_at, id"
)

# The facts of rule segments from the period's start on (index membership_history_segment)
# as (at, member, add, cause, expires_at: a Fact's fields, first), user, segment.
_RULE_FACTS = (
    f"SELECT {_us('occurred_at')}, kind = 'member', operation = 'add', cause,"  # nosec B608
    f" coalesce({_us('expires_at')}, {NEVER_US}), user_id, segment_id"
    " FROM membership_history"
    " WHERE segment_id = ANY($1::bigint[]) AND user_id > $2 AND user_id <= $3"
    " AND occurred_at >= $4 AND kind IS NOT NULL"
    " ORDER BY user_id, segment_id, occurred_at, id"
)

# The current explicit rows of rule segments: (user, segment, expiry, is an exclusion).
_RULE_ROWS = (
    f"SELECT user_id, segment_id, coalesce({_us('expires_at')}, {NEVER_US}), false"  # nosec B608
    " FROM memberships"
    " WHERE segment_id = ANY($1::bigint[]) AND user_id > $2 AND user_id <= $3"
    " UNION ALL SELECT user_id, segment_id, NULL, true FROM auto_exclusions"
    " WHERE segment_id = ANY($1::bigint[]) AND user_id > $2 AND user_id <= $3"
)

_KNOWN = (
    "SELECT coalesce(array_agg(user_id ORDER BY user_id), '{}') FROM ("
    " SELECT user_id FROM user_versions WHERE user_id > $1 ORDER BY user_id LIMIT $2) v"
)

# Dropped at commit.  report_rows: a row per change of a replayed pair; report_users:
# the users without explicit state in a rule segment, by bucket class, whose rows are
# their class's (report_classes, with the time already formatted: many users share it).
_TEMP_TABLES = """
    CREATE TEMP TABLE report_rows
        (user_id bigint, segment_id bigint, add boolean, at_us bigint) ON COMMIT DROP;
    CREATE TEMP TABLE report_users
        (user_id bigint, segment_id bigint, class int) ON COMMIT DROP;
    CREATE TEMP TABLE report_classes
        (segment_id bigint, class int, add boolean, at timestamptz, at_text text)
        ON COMMIT DROP;
"""
_AT_TEXT = "to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
_CLASSES = (
    "INSERT INTO report_classes SELECT s, k, a, t, "  # nosec B608: constant text
    + _AT_TEXT.format("t")
    + " FROM ("
    " SELECT s, k, a, to_timestamp(0) + t * interval '1 microsecond' AS t"
    " FROM unnest($1::bigint[], $2::int[], $3::bool[], $4::bigint[]) AS x(s, k, a, t)) c"
)
_USERS = "INSERT INTO report_users SELECT u, $2, $3 FROM unnest($1::bigint[]) AS u"

# The CSV.  $1, $2: the period; $3: the rule segments; $4: cells that would start a
# formula; $5, $6: the operations' names; for a per-user report, $7 the user.  Stored
# facts of the other segments: a membership beginning (not a renewal, not the
# migration's baseline) or ending is exactly what a reader saw; rows from before the
# migration (kind NULL) are shown as they were recorded.  Rows are sorted before the
# cells are formatted (OFFSET 0 keeps the formatting above the sort: the sort then
# moves narrow rows, and stays in memory).
_CSV = """
    SELECT r.user_id,
           CASE WHEN left(r.slug, 1) = ANY($4::text[]) THEN '''' || r.slug ELSE r.slug END,
           CASE WHEN r.add THEN $5::text ELSE $6::text END,
           coalesce(r.at_text, {at_text})
    FROM (
        SELECT * FROM (
            SELECT h.user_id, h.slug, h.operation = 'add' AS add, h.occurred_at AS at,
                   NULL::text AS at_text
            FROM membership_history h
            WHERE h.occurred_at >= $1 AND h.occurred_at < $2 {user_h}
              AND (h.kind IS NULL OR (h.kind = 'member' AND h.cause NOT IN ('renew', 'baseline')
                                      AND h.segment_id <> ALL($3::bigint[])))
            UNION ALL
            SELECT m.user_id, s.slug, false, m.expires_at, NULL
            FROM memberships m JOIN segments s ON s.id = m.segment_id
            WHERE m.expires_at >= $1 AND m.expires_at < $2 AND m.expires_at <= now() {user_m}
              AND m.segment_id <> ALL($3::bigint[])
            UNION ALL
            SELECT d.user_id, s.slug, d.add,
                   to_timestamp(0) + d.at_us * interval '1 microsecond', NULL
            FROM report_rows d JOIN segments s ON s.id = d.segment_id
            UNION ALL
            SELECT u.user_id, s.slug, c.add, c.at, c.at_text
            FROM report_users u JOIN report_classes c USING (segment_id, class)
            JOIN segments s ON s.id = u.segment_id
        ) q
        ORDER BY q.at, q.user_id, q.slug
        OFFSET 0
    ) r
"""
_CSV_ALL = _CSV.format(at_text=_AT_TEXT.format("r.at"), user_h="", user_m="")
_CSV_USER = _CSV.format(
    at_text=_AT_TEXT.format("r.at"), user_h="AND h.user_id = $7", user_m="AND m.user_id = $7"
)


async def timelines(conn: Conn) -> dict[int, Timeline]:
    out: dict[int, Timeline] = {}
    for sid, slug, at, operation, new_bp in await conn.fetch(_TIMELINES):
        timeline = out.get(sid)
        if timeline is None:
            timeline = out[sid] = Timeline(sid, slug)
        timeline.add(at, operation, new_bp)
    return out


async def now_us(conn: Conn) -> int:
    value = await conn.fetchval(f"SELECT {_us('now()')}")  # nosec B608: constant text
    return int(value)


async def derive(
    conn: Conn,
    rules: dict[int, Timeline],
    classes: dict[int, RuleClasses],
    lo: int,
    hi: int,
    known: Sequence[int],
    start: int,
    end: int,
    now: int,
) -> tuple[list[DerivedRow], list[tuple[int, int, list[int]]]]:
    """What readers saw of the rule segments ``rules`` in [start, end) for users in
    (lo, hi]: a row per change for every pair with explicit state, and (segment, class,
    users) for the ``known`` users without one, by bucket class (classes with rows)."""
    if not rules:
        return [], []
    ids = list(rules)
    # (user, segment) -> [facts from start on, current membership's expiry, excluded now]
    pairs: dict[tuple[int, int], list[Any]] = {}
    # Records whose first five fields are a Fact's serve as facts as they are.
    for fact in await conn.fetch(_RULE_FACTS, ids, lo, hi, from_us(start)):
        key = (fact[5], fact[6])
        pair = pairs.get(key)
        if pair is None:
            pair = pairs[key] = [[], None, False]
        pair[0].append(fact)
    for uid, sid, expires, exclusion in await conn.fetch(_RULE_ROWS, ids, lo, hi):
        pair = pairs.get((uid, sid))
        if pair is None:
            pair = pairs[(uid, sid)] = [[], None, False]
        if exclusion:
            pair[2] = True
        else:
            pair[1] = expires
    rows: list[DerivedRow] = []
    for (uid, sid), (facts, expiry, excluded) in pairs.items():
        state = initial_state(facts, expiry, excluded)
        for at, add in transitions(rules[sid], bucket(sid, uid), facts, state, start, end, now):
            rows.append((uid, sid, add, at))
    users: list[tuple[int, int, list[int]]] = []
    paired: dict[int, set[int]] = {}
    for uid, sid in pairs:
        paired.setdefault(sid, set()).add(uid)
    for sid, found in classes.items():
        if not (known and found.any):
            continue
        replayed = paired.get(sid, set())
        user_buckets = buckets(sid, known)
        bounds = [0, *found.thresholds, BUCKETS]
        for k, class_rows in enumerate(found.rows):
            if class_rows:
                # In C: the users whose bucket is in class k, less those replayed above.
                inside = map(range(bounds[k], bounds[k + 1]).__contains__, user_buckets)
                members = list(filterfalse(replayed.__contains__, compress(known, inside)))
                if members:
                    users.append((sid, k, members))
    return rows, users


async def write_csv(
    conn: Conn,
    start: dt.datetime,
    end: dt.datetime,
    user_id: int | None,
    formula_starts: Sequence[str],
    labels: tuple[str, str],
    sink: Callable[[bytes], Awaitable[None]],
    *,
    batch: int = REPORT_BATCH,
    copy_timeout_s: float | None = None,
) -> None:
    """The report's CSV rows (no header) in time order, from one snapshot."""
    now = await now_us(conn)
    start_us, end_us = to_us(start), to_us(end)
    rules = {
        sid: t for sid, t in (await timelines(conn)).items() if t.has_rule_during(start_us, end_us)
    }
    classes = {sid: rule_classes(t, start_us, end_us, now) for sid, t in rules.items()}
    await conn.execute(_TEMP_TABLES)
    if rules:
        flat = [
            (sid, k, add, at)
            for sid, found in classes.items()
            for k, class_rows in enumerate(found.rows)
            for at, add in class_rows
        ]
        if flat:
            await conn.execute(_CLASSES, *(list(column) for column in zip(*flat, strict=True)))
        lo = 0
        while True:
            if user_id is not None:
                lo, hi, known = user_id - 1, user_id, [user_id]
            else:
                known = await conn.fetchval(_KNOWN, lo, batch)
                hi = known[-1] if len(known) == batch else USER_ID_MAX
            rows, users = await derive(conn, rules, classes, lo, hi, known, start_us, end_us, now)
            if rows:
                await conn.copy_records_to_table("report_rows", records=rows)
            for sid, k, members in users:
                await conn.execute(_USERS, members, sid, k)
            if hi >= USER_ID_MAX or user_id is not None:
                break
            lo = hi
        # Row counts for the final plan (temporary tables are never auto-analyzed).
        await conn.execute("ANALYZE report_rows, report_users, report_classes")

    async def write(chunk: bytes) -> None:  # asyncpg wants a coroutine function
        await sink(chunk)

    args: list[Any] = [start, end, list(rules), list(formula_starts), *labels]
    if user_id is not None:
        args.append(user_id)
    await conn.copy_from_query(
        _CSV_ALL if user_id is None else _CSV_USER,
        *args,
        output=write,
        format="csv",
        delimiter=";",
        timeout=copy_timeout_s,
    )


async def last_transitions(conn: Conn, user_id: int) -> dict[int, tuple[int, bool]]:
    """segment id -> (when, add) of the last change a reader of ``user_id`` saw, over all
    of history since the migration (for explanations): the report's derivation, for
    every segment."""
    now = await now_us(conn)
    segments = await timelines(conn)
    classes = {sid: rule_classes(t, 0, now + 1, now) for sid, t in segments.items()}
    rows, users = await derive(
        conn, segments, classes, user_id - 1, user_id, [user_id], 0, now + 1, now
    )
    for sid, k, _ in users:
        rows.extend((user_id, sid, add, at) for at, add in classes[sid].rows[k])
    last: dict[int, tuple[int, bool]] = {}
    for _, sid, add, at in rows:
        if sid not in last or at >= last[sid][0]:
            last[sid] = (at, add)
    return last
