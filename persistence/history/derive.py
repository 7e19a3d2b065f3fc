"""Step 1 of a report, and explanations: the rule segments' timelines read, each pair
with explicit state replayed (``service/domain/history.py``), every other known user
hashed into the rules' bucket classes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, filterfalse
from typing import Any, TypeAlias

import asyncpg

from persistence.history.queries import (
    KNOWN,
    KNOWN_END,
    RULE_FACTS,
    RULE_ROWS,
    TIMELINES,
    Conn,
    from_us,
    micros,
)
from persistence.history.spool import Spool
from service.domain.history import (
    Members,
    RuleClasses,
    Timeline,
    buckets,
    initial_state,
    rule_classes,
    transitions,
)
from service.domain.rules import BUCKETS, USER_ID_MAX, bucket

# Pairs replayed, users hashed, between two looks at the connection (a few
# milliseconds at most): each statement the next batch's reads send waits for a look
# (figures in docs/performance.md).
REPLAY_SLICE = 100
CLASSIFY_SLICE = 10_000

# A derived row: (user_id, segment_id, add, at in microseconds).
DerivedRow: TypeAlias = tuple[int, int, bool, int]


async def timelines(conn: Conn) -> dict[int, Timeline]:
    out: dict[int, Timeline] = {}
    for sid, slug, at, operation, new_bp in await conn.fetch(TIMELINES):
        timeline = out.get(sid)
        if timeline is None:
            timeline = out[sid] = Timeline(sid, slug)
        timeline.add(at, operation, new_bp)
    return out


async def now_us(conn: Conn) -> int:
    value = await conn.fetchval(f"SELECT {micros('now()')}")  # nosec B608: constant text
    return int(value)


def _pairs(
    facts: Sequence[asyncpg.Record], current: Sequence[asyncpg.Record]
) -> dict[tuple[int, int], list[Any]]:
    """(user, segment) -> [facts from start on, current membership's expiry, excluded
    now], from the facts (``RULE_FACTS``) and current rows (``RULE_ROWS``) of pairs
    with explicit state."""
    pairs: dict[tuple[int, int], list[Any]] = {}
    # Records whose first five fields are a Fact's serve as facts as they are.
    for fact in facts:
        key = (fact[5], fact[6])
        pair = pairs.get(key)
        if pair is None:
            pair = pairs[key] = [[], None, False]
        pair[0].append(fact)
    for uid, sid, expires, exclusion in current:
        pair = pairs.get((uid, sid))
        if pair is None:
            pair = pairs[(uid, sid)] = [[], None, False]
        if exclusion:
            pair[2] = True
        else:
            pair[1] = expires
    return pairs


def replay(
    pairs: Iterable[tuple[tuple[int, int], list[Any]]],
    rules: dict[int, Timeline],
    start: int,
    end: int,
    now: int,
    rows: list[DerivedRow],
) -> None:
    """Each pair (``_pairs``) replayed: a row per change a reader saw in [start, end)."""
    for (uid, sid), (pair_facts, expiry, excluded) in pairs:
        state = initial_state(pair_facts, expiry, excluded)
        found = transitions(rules[sid], bucket(sid, uid), pair_facts, state, start, end, now)
        for at, add in found:
            rows.append((uid, sid, add, at))


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
    facts = await conn.fetch(RULE_FACTS, ids, lo, hi, from_us(start))
    current = await conn.fetch(RULE_ROWS, ids, lo, hi)
    pairs = _pairs(facts, current)
    rows: list[DerivedRow] = []
    replay(pairs.items(), rules, start, end, now, rows)
    paired: dict[int, set[int]] = {}
    for uid, sid in pairs:
        paired.setdefault(sid, set()).add(uid)
    users: list[tuple[int, int, list[int]]] = []
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


@dataclass(slots=True)
class Batch:
    """A batch of users: ids in (lo, hi]."""

    lo: int
    hi: int


@dataclass(slots=True)
class Classes:
    """The rows rule classes give users without explicit state: a key per (instant,
    segment, add), each with the buckets that have it."""

    instants: list[int]  # microseconds, ascending
    keys: list[tuple[int, int, bool]]  # (index in instants, segment, add)
    tables: list[bytes]  # per key: the buckets that have it (history.Members)
    # Per instant: its keys in the order of their slugs, and each key's rank there.
    at: list[list[int]] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    # Per key: the rest of its lines after the user id (";slug;operation;time\n").
    cells: list[bytes] = field(default_factory=list)
    # Per key: (batch index, spool slice of the members' ids, a line each).
    spooled: list[list[tuple[int, tuple[int, int]]]] = field(default_factory=list)

    @classmethod
    def of(cls, classes: dict[int, RuleClasses]) -> Classes:
        by_row = {sid: found.tables() for sid, found in classes.items()}
        instants = sorted({at for tables in by_row.values() for at, _ in tables})
        index = {at: i for i, at in enumerate(instants)}
        keys, tables = [], []
        for sid, found_tables in by_row.items():
            for (at, add), table in sorted(found_tables.items()):
                keys.append((index[at], sid, add))
                tables.append(table)
        return cls(instants, keys, tables)

    def segments(self) -> dict[int, list[int]]:
        """segment -> its keys."""
        out: dict[int, list[int]] = {}
        for k, (_, sid, _) in enumerate(self.keys):
            out.setdefault(sid, []).append(k)
        return out


async def replay_all(
    conn: Conn,
    rules: dict[int, Timeline],
    classes: Classes,
    start: int,
    end: int,
    now: int,
    user_id: int | None,
    batch: int,
    spool: Spool,
    timeout_s: float | None,
) -> list[Batch]:
    """Step 1, batch by batch of known users: replay every pair with explicit state in
    a rule segment into report_rows, and spool the members of each of ``classes``'
    keys.  A batch's reads (and the writes of the one before) are sent before the batch
    before it is worked on: PostgreSQL reads while Python replays and hashes."""
    ids = list(rules)
    by_segment = {
        sid: (keys, Members(sid, [classes.tables[k] for k in keys]))
        for sid, keys in classes.segments().items()
    }
    classes.spooled = [[] for _ in classes.keys]

    async def read(lo: int, write: list[DerivedRow]) -> tuple[Batch, bytes, list[Any], list[Any]]:
        if write:
            await conn.copy_records_to_table("report_rows", records=write, timeout=timeout_s)
        known = b""
        if user_id is not None:
            found = Batch(user_id - 1, user_id)
            known = b"%d\n" % user_id
        elif by_segment:
            known = await conn.fetchval(KNOWN, lo, batch) or b""
            count = known.count(b"\n")
            last = known[known.rfind(b"\n", 0, len(known) - 1) + 1 : -1]
            found = Batch(lo, int(last) if count == batch else USER_ID_MAX)
        else:
            ends = await conn.fetchrow(KNOWN_END, lo, batch)
            assert ends is not None  # nosec B101: an aggregate has a row
            found = Batch(lo, ends[1] if ends[0] == batch else USER_ID_MAX)
        facts = await conn.fetch(RULE_FACTS, ids, found.lo, found.hi, from_us(start))
        current = await conn.fetch(RULE_ROWS, ids, found.lo, found.hi)
        return found, known, facts, current

    batches: list[Batch] = []
    unsent: list[DerivedRow] = []
    reading: asyncio.Task[tuple[Batch, bytes, list[Any], list[Any]]] | None
    reading = asyncio.ensure_future(read(0, []))
    try:
        while reading is not None:
            found, known, facts, current = await reading
            reading = None
            if found.hi < USER_ID_MAX and user_id is None:
                reading = asyncio.ensure_future(read(found.hi, unsent))
                unsent = []
            pairs = list(_pairs(facts, current).items())
            for first in range(0, len(pairs), REPLAY_SLICE):
                replay(pairs[first : first + REPLAY_SLICE], rules, start, end, now, unsent)
                await asyncio.sleep(0)  # let the next batch's reads move on
            if by_segment:
                replayed: dict[int, set[bytes]] = {}
                for (uid, sid), _ in pairs:
                    replayed.setdefault(sid, set()).add(b"%d" % uid)
                users = known.split(b"\n")
                users.pop()  # after the last newline
                await _classify(users, replayed, by_segment, len(batches), classes, spool)
            batches.append(found)
    finally:
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    if unsent:
        await conn.copy_records_to_table("report_rows", records=unsent, timeout=timeout_s)
    return batches


async def _classify(
    users: list[bytes],
    replayed: dict[int, set[bytes]],
    by_segment: dict[int, tuple[list[int], Members]],
    n: int,
    classes: Classes,
    spool: Spool,
) -> None:
    """The members of each key among a batch's known users (batch ``n``): those without
    explicit state in its segment (``replayed``) whose bucket has its row."""
    for sid, (keys, of_segment) in by_segment.items():
        skip = replayed.get(sid, set())
        chosen: list[list[bytes]] = [[] for _ in keys]
        for first in range(0, len(users), CLASSIFY_SLICE):
            some = of_segment.of(users[first : first + CLASSIFY_SLICE], skip)
            for ids, more in zip(chosen, some, strict=True):
                ids.extend(more)
            await asyncio.sleep(0)  # let the next batch's reads move on
        for k, ids in zip(keys, chosen, strict=True):
            if ids:
                classes.spooled[k].append((n, spool.put(b"\n".join(ids))))


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
