"""History reports from PostgreSQL: stored facts and segment rules -> what readers saw.

The derivation itself is pure (``service/domain/history.py``); this module reads what
it needs and streams the CSV, in one repeatable-read snapshot, on one connection
(``write_csv``):

1. Segments whose rule includes anyone during the period ("rule segments") need the
   derivation.  Users are taken in id batches (memory stays flat): their facts in
   those segments from the period's start on and their current rows are read, each
   pair with explicit state is replayed (``transitions``) into a temporary table
   (binary COPY), and every other known user (a row in ``user_versions``; for a
   per-user report, the one user, seen or not) is hashed into the rule's bucket
   classes (``history.Members``): the members of each class row are set aside (a
   spool: in memory up to SPOOL_MEMORY, then a temporary file).  A batch's reads are
   sent before the batch before it is worked on: PostgreSQL reads while Python
   replays and hashes.
2. The classes' rows all fall on a few instants (the rules' changes).  One ``COPY
   (...) TO STDOUT`` formats and sorts everything else (the stored facts of the other
   segments, which are what readers saw of them, the expiries not swept yet, the
   replayed rows) with a marker row at each of those instants; PostgreSQL's rows at
   exactly those instants are read before it.  The CSV goes to the sink as it comes,
   but for the markers' lines: each becomes the classes' rows at its instant (a user
   id, then the row's cells as PostgreSQL formats them), merged with PostgreSQL's rows
   there by user and slug (in the database's collation: PostgreSQL counts, for each
   of its rows, the class rows whose slug sorts first).

Measured with bench/report_history.py (1,000,000 stored facts in a month, a rule
created at 10 % and raised to 30 % over 1,000,000 known users: 1,287,982 rows, 64 MB):
the report took 3.3-4.1 s through the API (4.7x its ceiling) when the classes' rows
went through temporary tables into one sort of all the rows, after the hashing; see
``write_csv`` for what each step saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import re
import secrets
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, filterfalse
from typing import IO, TYPE_CHECKING, Any, TypeAlias

import asyncpg

from service.domain.history import (
    NEVER_US,
    Members,
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

# Known users per batch of a month-wide report: bounds the memory of a batch (its
# facts, what is derived for it).
REPORT_BATCH = 100_000

# work_mem of a report's transaction: the final query's sorts (one per parallel
# process: about 40 MB each in the benchmark).
REPORT_WORK_MEM = "128MB"

# The final query's cost of a row passed between parallel processes (write_csv).
REPORT_PARALLEL_TUPLE_COST = 0.01

# What a report sets aside (the classes' members, PostgreSQL's rows at the rules'
# instants) stays in memory up to this size, then goes to a temporary file.
SPOOL_MEMORY = 16 * 1024 * 1024

# Pairs replayed, users hashed, between two looks at the connection (a few
# milliseconds at most): each statement the next batch's reads send waits for a look.
# (Hashing 100,000 users between looks, a statement once waited 0.4-0.5 s, PostgreSQL
# idle.)
REPLAY_SLICE = 100
CLASSIFY_SLICE = 10_000

# What is read back from the spool at once.
SPOOL_PIECE = 1024 * 1024

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

# A batch of known users: their ids in decimal, a line each, as the bucket's key wants
# them, in one value, one round trip.  (A text COPY costs PostgreSQL less, 12-15
# against 22 ms a batch, but asyncpg hands its data over a socket read at a time, so
# it moves on only as often as the replay looks up: step 1 took 0.60-0.71 s either
# way.)
_KNOWN = (
    "SELECT convert_to(string_agg(user_id::text, E'\\n' ORDER BY user_id) || E'\\n', 'UTF8')"
    " FROM (SELECT user_id FROM user_versions WHERE user_id > $1 ORDER BY user_id LIMIT $2) v"
)
# Only where a batch ends (no class has rows: nothing to hash).
_KNOWN_END = (
    "SELECT count(*), max(user_id) FROM ("
    " SELECT user_id FROM user_versions WHERE user_id > $1 ORDER BY user_id LIMIT $2) v"
)

# Dropped at commit: a row per change of a replayed pair.
_TEMP_TABLES = """
    CREATE TEMP TABLE report_rows
        (user_id bigint, segment_id bigint, add boolean, at_us bigint) ON COMMIT DROP
"""


def _cells(row: str, formula: int, month: str) -> str:
    """The four CSV cells of ``row`` (user_id, slug, add, at): a slug that would start a
    formula gets an apostrophe (${formula}: the code points of those starts), the
    operation its name (${formula + 1}, ${formula + 2}), the time ISO 8601 in UTC.

    Cheaper forms, measured on the final query of bench/report_history.py (A/B, same
    output, median of 8): ``ascii(slug)`` against the codes rather than ``left(slug,
    1)`` against the characters, and the time's year and month written in (``month``,
    every row is in the report's month) rather than formatted: 1.10 s against 1.23 s."""
    return (
        f"{row}.user_id AS user_id,"
        f" CASE WHEN ascii({row}.slug) = ANY(${formula}::int[])"
        f" THEN '''' || {row}.slug ELSE {row}.slug END AS slug_cell,"
        f" CASE WHEN {row}.add THEN ${formula + 1}::text ELSE ${formula + 2}::text END AS op,"
        f" '{month}' || to_char({row}.at AT TIME ZONE 'UTC', 'DD\"T\"HH24:MI:SS.US\"Z\"')"
        " AS at_text"
    )


def _month(start: dt.datetime) -> str:
    """What every time in the report's month starts with: "YYYY-MM-"."""
    month = f"{start.year:04d}-{start.month:02d}-"
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-", month)  # nosec B101: digits, written in SQL
    return month


def _codes(formula_starts: Sequence[str]) -> list[int]:
    """The code points of the characters that start a formula."""
    if any(len(start) != 1 for start in formula_starts):
        raise ValueError(f"formula starts must be single characters: {formula_starts!r}")
    return [ord(start) for start in formula_starts]


# What readers saw, but the classes' rows, as (user_id, slug, add, at).  $1, $2: the
# period; $3: the rule segments; $7, $8: the rules' instants (timestamptz,
# microseconds): rows at those instants or not ({at}: ``= ANY`` or ``<> ALL``).
# Stored facts of the other segments: a membership beginning (not a renewal, not the
# migration's baseline) or ending is exactly what a reader saw; rows from before the
# migration (kind NULL) are shown as they were recorded.  Then the expiries not swept
# yet, and the replayed rows.  For a per-user report ({user_h}, {user_m}) the user is
# a parameter; report_rows holds only theirs.
_SOURCES = (
    """
    SELECT h.user_id, h.slug, h.operation = 'add' AS add, h.occurred_at AS at
    FROM membership_history h
    WHERE h.occurred_at >= $1 AND h.occurred_at < $2 {user_h}
      AND (h.kind IS NULL OR (h.kind = 'member' AND h.cause NOT IN ('renew', 'baseline')
                              AND h.segment_id <> ALL($3::bigint[])))
      AND h.occurred_at {at}($7::timestamptz[])
    """,
    """
    SELECT m.user_id, s.slug, false AS add, m.expires_at AS at
    FROM memberships m JOIN segments s ON s.id = m.segment_id
    WHERE m.expires_at >= $1 AND m.expires_at < $2 AND m.expires_at <= now() {user_m}
      AND m.segment_id <> ALL($3::bigint[]) AND m.expires_at {at}($7::timestamptz[])
    """,
    """
    SELECT d.user_id, s.slug, d.add, to_timestamp(0) + d.at_us * interval '1 microsecond' AS at
    FROM report_rows d JOIN segments s ON s.id = d.segment_id
    WHERE d.at_us {at}($8::int8[])
    """,
)

# A marker row at each of the rules' instants: slug $9 (random) || ':' || its index
# (1-based).  Nothing else is at those instants in the CSV query.
_MARKERS = """
    SELECT NULL::bigint AS user_id, $9::text || ':' || i AS slug, NULL::boolean AS add, t AS at
    FROM unnest($7::timestamptz[]) WITH ORDINALITY AS x(t, i)
"""


def _sources(at: str, user: int | None) -> list[str]:
    """_SOURCES for the user ``$user`` alone, or for everyone (None)."""
    return [
        source.format(
            at=at,
            user_h="" if user is None else f"AND h.user_id = ${user}",
            user_m="" if user is None else f"AND m.user_id = ${user}",
        )
        for source in _SOURCES
    ]


def _csv_query(user_id: int | None, month: str) -> str:
    """The CSV but the rows at the rules' instants, with the markers.  $4: cells that
    would start a formula; $5, $6: the operations' names; $10: the user of a per-user
    report.  Each source is formatted and sorted on its own, then they are merged: the
    stored facts, nearly all the rows, can then be formatted and sorted by parallel
    workers, and the session only merges and writes (see write_csv)."""
    sources = [*_sources("<> ALL", None if user_id is None else 10), _MARKERS]
    sorted_sources = " UNION ALL ".join(
        f"SELECT * FROM (SELECT {_cells('r', 4, month)}, r.at, r.slug FROM ({source}) r"  # nosec B608
        f" ORDER BY r.at, r.user_id, r.slug) s{n}"
        for n, source in enumerate(sources)
    )
    return (
        "SELECT u.user_id, u.slug_cell, u.op, u.at_text"  # nosec B608: constant text
        f" FROM ({sorted_sources}) u ORDER BY u.at, u.user_id, u.slug"
    )


# The rows at the rules' instants, in the CSV's order, each after the index of its
# instant (1-based) and how many of the classes' rows at that instant have a slug
# that sorts before its own ($9, $10: each class row's instant and segment); $11: the
# user of a per-user report.
_AT_INSTANTS = """
    SELECT array_position($7::timestamptz[], r.at),
           (SELECT count(*) FROM unnest($9::int[], $10::bigint[]) AS k(i, sid)
            JOIN segments ks ON ks.id = k.sid
            WHERE k.i = array_position($7::timestamptz[], r.at) AND ks.slug < r.slug),
           {cells}
    FROM (SELECT * FROM ({rows}) q ORDER BY q.at, q.user_id, q.slug OFFSET 0) r
"""


def _at_instants_query(user_id: int | None, month: str) -> str:
    rows = " UNION ALL ".join(_sources("= ANY", None if user_id is None else 11))
    return _AT_INSTANTS.format(cells=_cells("r", 4, month), rows=rows)


# Each class row without its user ($4, ..: its instant's index, segment, add, time),
# in the order of the slugs at each instant: the rest of a line, after the user id.
_CLASS_CELLS = """
    SELECT x.k, {cells}
    FROM (SELECT x.k, NULL::bigint AS user_id, s.slug, x.add, x.at, x.i
          FROM unnest($4::int[], $5::int[], $6::bigint[], $7::bool[], $8::timestamptz[])
               AS x(k, i, sid, add, at)
          JOIN segments s ON s.id = x.sid) x
    ORDER BY x.i, x.slug, x.k
"""


def _class_cells_query(month: str) -> str:
    return _CLASS_CELLS.format(cells=_cells("x", 1, month))


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


def _pairs(
    facts: Sequence[asyncpg.Record], current: Sequence[asyncpg.Record]
) -> dict[tuple[int, int], list[Any]]:
    """(user, segment) -> [facts from start on, current membership's expiry, excluded
    now], from the facts (``_RULE_FACTS``) and current rows (``_RULE_ROWS``) of pairs
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
    facts = await conn.fetch(_RULE_FACTS, ids, lo, hi, from_us(start))
    current = await conn.fetch(_RULE_ROWS, ids, lo, hi)
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


class _Spool:
    """Bytes set aside during a report: in memory up to SPOOL_MEMORY, then in a
    temporary file (deleted when closed)."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        self._size = 0

    def put(self, data: bytes) -> tuple[int, int]:
        self._file.seek(self._size)
        self._file.write(data)
        where = (self._size, len(data))
        self._size += len(data)
        return where

    def get(self, where: tuple[int, int]) -> bytes:
        self._file.seek(where[0])
        return self._file.read(where[1])

    def close(self) -> None:
        self._file.close()


@dataclass(slots=True)
class _Batch:
    """A batch of users: ids in (lo, hi]."""

    lo: int
    hi: int


@dataclass(slots=True)
class _Classes:
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
    def of(cls, classes: dict[int, RuleClasses]) -> _Classes:
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


async def _copy_out(
    conn: Conn, query: str, args: Sequence[Any], timeout_s: float | None, **options: Any
) -> bytes:
    chunks: list[bytes] = []

    async def keep(chunk: bytes) -> None:
        chunks.append(chunk)

    await conn.copy_from_query(query, *args, output=keep, timeout=timeout_s, **options)
    return b"".join(chunks)


async def _replay_all(
    conn: Conn,
    rules: dict[int, Timeline],
    classes: _Classes,
    start: int,
    end: int,
    now: int,
    user_id: int | None,
    batch: int,
    spool: _Spool,
    timeout_s: float | None,
) -> list[_Batch]:
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

    async def read(lo: int, write: list[DerivedRow]) -> tuple[_Batch, bytes, list[Any], list[Any]]:
        if write:
            await conn.copy_records_to_table("report_rows", records=write, timeout=timeout_s)
        known = b""
        if user_id is not None:
            found = _Batch(user_id - 1, user_id)
            known = b"%d\n" % user_id
        elif by_segment:
            known = await conn.fetchval(_KNOWN, lo, batch) or b""
            count = known.count(b"\n")
            last = known[known.rfind(b"\n", 0, len(known) - 1) + 1 : -1]
            found = _Batch(lo, int(last) if count == batch else USER_ID_MAX)
        else:
            ends = await conn.fetchrow(_KNOWN_END, lo, batch)
            assert ends is not None  # nosec B101: an aggregate has a row
            found = _Batch(lo, ends[1] if ends[0] == batch else USER_ID_MAX)
        facts = await conn.fetch(_RULE_FACTS, ids, found.lo, found.hi, from_us(start))
        current = await conn.fetch(_RULE_ROWS, ids, found.lo, found.hi)
        return found, known, facts, current

    batches: list[_Batch] = []
    unsent: list[DerivedRow] = []
    reading: asyncio.Task[tuple[_Batch, bytes, list[Any], list[Any]]] | None
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
    classes: _Classes,
    spool: _Spool,
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


def _lines(data: bytes) -> Iterator[bytes]:
    """CSV lines (each with its newline): a quoted cell may hold a newline."""
    start = 0
    while start < len(data):
        end = data.index(b"\n", start) + 1
        while data.count(b'"', start, end) % 2:
            end = data.index(b"\n", end) + 1
        yield data[start:end]
        start = end


class _Instants:
    """Writes the classes' rows at each instant, merged with PostgreSQL's rows there."""

    def __init__(
        self,
        sink: Callable[[bytes], Awaitable[None]],
        spool: _Spool,
        batches: list[_Batch],
        classes: _Classes,
        theirs: tuple[int, int],
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._batches = batches
        self._classes = classes
        # (instant index, user, how many class rows there sort before it, line)
        self._theirs = self._parse(theirs)
        self._next = next(self._theirs, None)

    def _parse(self, where: tuple[int, int]) -> Iterator[tuple[int, int, int, bytes]]:
        """PostgreSQL's rows at the instants (spooled), read a piece at a time."""
        offset, left = where
        carry = b""
        while left or carry:
            piece = self._spool.get((offset, min(left, SPOOL_PIECE)))
            offset, left = offset + len(piece), left - len(piece)
            data = carry + piece
            cut = len(data)
            if left:  # whole lines only: a quoted cell may hold a newline
                cut = data.rfind(b"\n") + 1
                while data.count(b'"', 0, cut) % 2:
                    cut = data.rfind(b"\n", 0, cut - 1) + 1
            carry = data[cut:]
            for line in _lines(data[:cut]):
                i, before, rest = line.split(b";", 2)
                yield int(i) - 1, int(rest[: rest.index(b";")]), int(before), rest

    async def write(self, i: int) -> None:
        keys = self._classes.at[i]
        for n, found in enumerate(self._batches):
            ours = [(k, where) for k in keys for b, where in self._classes.spooled[k] if b == n]
            theirs = []
            while self._next is not None and self._next[0] == i and self._next[1] <= found.hi:
                theirs.append(self._next[1:])
                self._next = next(self._theirs, None)
            if len(ours) == 1:
                # The usual case: one segment's rule changed at this instant.
                await self._sink(self._one(*ours[0], theirs))
            elif ours or theirs:
                await self._merge(ours, theirs)
        while self._next is not None and self._next[0] == i:  # users past every batch
            await self._sink(self._next[3])
            self._next = next(self._theirs, None)

    def _one(self, k: int, where: tuple[int, int], theirs: list[tuple[int, int, bytes]]) -> bytes:
        """Key ``k``'s lines (a user id, then the key's cells), merged with ``theirs``."""
        cells = self._classes.cells[k]
        ids = self._spool.get(where)
        if not theirs:
            return ids.replace(b"\n", cells) + cells
        split = ids.split(b"\n")
        users = list(map(int, split))
        rank = self._classes.rank[k]
        parts: list[bytes] = []
        done = 0
        for user, before, line in theirs:
            # This key's row for `user`, if any, comes first when its slug sorts first.
            if rank <= before:
                cut = bisect_right(users, user, done)
            else:
                cut = bisect_left(users, user, done)
            if cut > done:
                parts.append(cells.join(split[done:cut]) + cells)
                done = cut
            parts.append(line)
        if done < len(split):
            parts.append(cells.join(split[done:]) + cells)
        return b"".join(parts)

    async def _merge(
        self, ours: list[tuple[int, tuple[int, int]]], theirs: list[tuple[int, int, bytes]]
    ) -> None:
        """Class rows sort by (user, slug), PostgreSQL's rows at the instant come sorted
        so, each with how many class rows of its user sort before it."""
        streams = []
        for k, where in ours:
            ids = self._spool.get(where).split(b"\n")
            users = list(map(int, ids))
            rank, cells = self._classes.rank[k], self._classes.cells[k]
            streams.append([(u, rank, u_id + cells) for u, u_id in zip(users, ids, strict=True)])
        entries = streams[0] if len(streams) == 1 else list(heapq.merge(*streams))
        users = [e[0] for e in entries]
        done = 0
        parts: list[bytes] = []
        for user, before, line in theirs:
            # Class rows of this user with a rank up to `before` come first.
            cut = bisect_left(users, user, done)
            while cut < len(entries) and entries[cut][0] == user and entries[cut][1] <= before:
                cut += 1
            parts.extend(e[2] for e in entries[done:cut])
            parts.append(line)
            done = cut
        parts.extend(e[2] for e in entries[done:])
        await self._sink(b"".join(parts))


class _Markers:
    """Passes the CSV through, writing the classes' rows in place of each marker line."""

    def __init__(
        self, sink: Callable[[bytes], Awaitable[None]], token: bytes, instants: _Instants | None
    ) -> None:
        self._sink = sink
        self._token = token
        self._instants = instants
        self._carry = b""

    async def feed(self, chunk: bytes) -> None:
        if self._instants is None:
            await self._sink(chunk)
            return
        data = self._carry + chunk if self._carry else chunk
        at = data.find(self._token)
        while at >= 0:
            begin = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            if end < 0:
                break  # the marker's line is not all here yet
            if begin:
                await self._sink(data[:begin])
            tail = data[at + len(self._token) + 1 : end]
            assert self._instants is not None  # nosec B101: markers only with instants
            await self._instants.write(int(tail[: tail.index(b";")]) - 1)
            data = data[end + 1 :]
            at = data.find(self._token)
        # Keep a partial last line: a marker's line may be cut in two.
        cut = data.rfind(b"\n") + 1
        if cut:
            await self._sink(data[:cut])
        self._carry = data[cut:]

    async def close(self) -> None:
        if self._carry:  # the CSV ends with a newline: nothing is left, but in case
            await self._sink(self._carry)


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
    """The report's CSV rows (no header) in time order, from one snapshot (the module's
    docstring says how).

    What each part saves, measured with bench/report_history.py on a shared 2-core
    machine (medians of alternating rounds; the same CSV, byte for byte):

    * the classes' rows (294,212 in the benchmark) written at the markers rather than
      through temporary tables into PostgreSQL's sort and formatting, the users hashed
      from PostgreSQL's text (``history.Members``: 0.24-0.36 s for 1,000,000 users and
      two class rows, against 0.57-0.67 s): 2.2-2.5 s in-process, from 3.0-3.7 s;
    * parallel workers formatting and sorting the stored facts: 1.9-2.0 s in-process,
      2.67 s through the API against 2.85 s;
    * cheaper cells (``_cells``): the final query 1.10 s against 1.23 s.

    Tried and not kept: handing the sink 256 kB at a time (the API took as long, 1.89
    against 1.78 s; only the client's CPU halved); hashing while PostgreSQL sorts
    rather than between step 1's reads (as fast, 1.95-2.12 s against 2.05-2.08 s, with
    one more task); a streaming plan (a parallel index scan and incremental sort:
    no faster, and the first marker would wait for the hashing).
    """
    now = await now_us(conn)
    start_us, end_us = to_us(start), to_us(end)
    rules = {
        sid: t for sid, t in (await timelines(conn)).items() if t.has_rule_during(start_us, end_us)
    }
    classes = _Classes.of({sid: rule_classes(t, start_us, end_us, now) for sid, t in rules.items()})
    await conn.execute(_TEMP_TABLES)
    month = _month(start)
    user: list[Any] = [] if user_id is None else [user_id]
    async with _spooled() as spool:
        batches = []
        if rules:
            batches = await _replay_all(
                conn,
                rules,
                classes,
                start_us,
                end_us,
                now,
                user_id,
                batch,
                spool,
                copy_timeout_s,
            )
        period: list[Any] = [start, end, list(rules), _codes(formula_starts), *labels]
        period += [[from_us(t) for t in classes.instants], classes.instants]
        instants: _Instants | None = None
        if classes.keys:
            await _class_cells(conn, classes, month, formula_starts, labels, copy_timeout_s)
            keys = [[i + 1 for i, _, _ in classes.keys], [sid for _, sid, _ in classes.keys]]
            theirs = await _copy_to(
                spool,
                conn,
                _at_instants_query(user_id, month),
                [*period, *keys, *user],
                copy_timeout_s,
            )
            instants = _Instants(sink, spool, batches, classes, theirs)
        # Parallel workers format and sort the stored facts (at PostgreSQL's default
        # cost of a row passed between processes, 0.1, the plan stays serial): 1.9-2.0
        # s against 2.2-2.5 s for the report in-process (see above).
        await conn.execute(f"SET LOCAL parallel_tuple_cost = {REPORT_PARALLEL_TUPLE_COST}")
        token = secrets.token_hex(16)
        markers = _Markers(sink, token.encode(), instants)
        await conn.copy_from_query(
            _csv_query(user_id, month),
            *period,
            token,
            *user,
            output=markers.feed,
            format="csv",
            delimiter=";",
            timeout=copy_timeout_s,
        )
        await markers.close()


async def _copy_to(
    spool: _Spool, conn: Conn, query: str, args: Sequence[Any], timeout_s: float | None
) -> tuple[int, int]:
    """A CSV COPY's bytes into the spool: where they are."""
    first = -1
    size = 0

    async def keep(chunk: bytes) -> None:
        nonlocal first, size
        offset, length = spool.put(chunk)
        first = offset if first < 0 else first
        size += length

    await conn.copy_from_query(
        query, *args, output=keep, format="csv", delimiter=";", timeout=timeout_s
    )
    return max(first, 0), size


@contextlib.asynccontextmanager
async def _spooled() -> AsyncIterator[_Spool]:
    spool = _Spool()
    try:
        yield spool
    finally:
        spool.close()


async def _class_cells(
    conn: Conn,
    classes: _Classes,
    month: str,
    formula_starts: Sequence[str],
    labels: tuple[str, str],
    timeout_s: float | None,
) -> None:
    """Each key's cells after the user id, as the CSV writes them, and the order of the
    keys' slugs at each instant (the database's collation)."""
    lines = await _copy_out(
        conn,
        _class_cells_query(month),
        [
            _codes(formula_starts),
            *labels,
            list(range(len(classes.keys))),
            [i for i, _, _ in classes.keys],
            [sid for _, sid, _ in classes.keys],
            [add for _, _, add in classes.keys],
            [from_us(classes.instants[i]) for i, _, _ in classes.keys],
        ],
        timeout_s,
        format="csv",
        delimiter=";",
    )
    classes.cells = [b""] * len(classes.keys)
    classes.rank = [0] * len(classes.keys)
    classes.at = [[] for _ in classes.instants]
    for line in _lines(lines):
        k_text, cells = line.split(b";", 1)
        k = int(k_text)
        keys = classes.at[classes.keys[k][0]]
        keys.append(k)
        classes.rank[k] = len(keys)
        classes.cells[k] = cells[cells.index(b";") :]


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
