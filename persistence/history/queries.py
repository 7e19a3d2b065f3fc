"""The history report's SQL text, and how its cells are formatted in PostgreSQL.

Constant text only (hence the B608 exemptions): every value is a $n parameter.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from service.domain.history import NEVER_US

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def micros(column: str) -> str:
    """A timestamptz column as integer microseconds since the epoch (exact)."""
    return f"(extract(epoch FROM {column}) * 1000000)::int8"


def to_us(value: dt.datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=value)


TIMELINES = (
    f"SELECT segment_id, slug, {micros('occurred_at')}, operation, new_bp"  # nosec B608
    " FROM segment_history ORDER BY segment_id, occurred_at, id"
)

# The facts of rule segments from the period's start on (index membership_history_segment)
# as (at, member, add, cause, expires_at: a Fact's fields, first), user, segment.
RULE_FACTS = (
    f"SELECT {micros('occurred_at')}, kind = 'member', operation = 'add', cause,"  # nosec B608
    f" coalesce({micros('expires_at')}, {NEVER_US}), user_id, segment_id"
    " FROM membership_history"
    " WHERE segment_id = ANY($1::bigint[]) AND user_id > $2 AND user_id <= $3"
    " AND occurred_at >= $4 AND kind IS NOT NULL"
    " ORDER BY user_id, segment_id, occurred_at, id"
)

# The current explicit rows of rule segments: (user, segment, expiry, is an exclusion).
RULE_ROWS = (
    f"SELECT user_id, segment_id, coalesce({micros('expires_at')}, {NEVER_US}), false"  # nosec B608
    " FROM memberships"
    " WHERE segment_id = ANY($1::bigint[]) AND user_id > $2 AND user_id <= $3"
    " UNION ALL SELECT user_id, segment_id, NULL, true FROM auto_exclusions"
    " WHERE segment_id = ANY($1::bigint[]) AND user_id > $2 AND user_id <= $3"
)

# A batch of known users: their ids in decimal, a line each, as the bucket's key wants
# them, in one value, one round trip.  (A text COPY costs PostgreSQL less, but asyncpg
# hands its data over a socket read at a time, so it gained nothing: figures in
# docs/performance.md.)
KNOWN = (
    "SELECT convert_to(string_agg(user_id::text, E'\\n' ORDER BY user_id) || E'\\n', 'UTF8')"
    " FROM (SELECT user_id FROM user_versions WHERE user_id > $1 ORDER BY user_id LIMIT $2) v"
)
# Only where a batch ends (no class has rows: nothing to hash).
KNOWN_END = (
    "SELECT count(*), max(user_id) FROM ("
    " SELECT user_id FROM user_versions WHERE user_id > $1 ORDER BY user_id LIMIT $2) v"
)

# Dropped at commit: a row per change of a replayed pair.
TEMP_TABLES = """
    CREATE TEMP TABLE report_rows
        (user_id bigint, segment_id bigint, add boolean, at_us bigint) ON COMMIT DROP
"""


def cells_sql(row: str, formula: int, month: str) -> str:
    """The four CSV cells of ``row`` (user_id, slug, add, at): a slug that would start a
    formula gets an apostrophe (${formula}: the code points of those starts), the
    operation its name (${formula + 1}, ${formula + 2}), the time ISO 8601 in UTC.

    The cheaper forms (measured: docs/performance.md): ``ascii(slug)`` against the codes
    rather than ``left(slug, 1)`` against the characters, and the time's year and month
    written in (``month``, every row is in the report's month) rather than formatted."""
    return (
        f"{row}.user_id AS user_id,"
        f" CASE WHEN ascii({row}.slug) = ANY(${formula}::int[])"
        f" THEN '''' || {row}.slug ELSE {row}.slug END AS slug_cell,"
        f" CASE WHEN {row}.add THEN ${formula + 1}::text ELSE ${formula + 2}::text END AS op,"
        f" '{month}' || to_char({row}.at AT TIME ZONE 'UTC', 'DD\"T\"HH24:MI:SS.US\"Z\"')"
        " AS at_text"
    )


def month_prefix(start: dt.datetime) -> str:
    """What every time in the report's month starts with: "YYYY-MM-"."""
    month = f"{start.year:04d}-{start.month:02d}-"
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-", month)  # nosec B101: digits, written in SQL
    return month


def formula_codes(formula_starts: Sequence[str]) -> list[int]:
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


def csv_query(user_id: int | None, month: str) -> str:
    """The CSV but the rows at the rules' instants, with the markers.  $4: cells that
    would start a formula; $5, $6: the operations' names; $10: the user of a per-user
    report.  Each source is formatted and sorted on its own, then they are merged: the
    stored facts, nearly all the rows, can then be formatted and sorted by parallel
    workers, and the session only merges and writes (see write_csv)."""
    sources = [*_sources("<> ALL", None if user_id is None else 10), _MARKERS]
    sorted_sources = " UNION ALL ".join(
        f"SELECT * FROM (SELECT {cells_sql('r', 4, month)}, r.at, r.slug FROM ({source}) r"  # nosec B608
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


def at_instants_query(user_id: int | None, month: str) -> str:
    rows = " UNION ALL ".join(_sources("= ANY", None if user_id is None else 11))
    return _AT_INSTANTS.format(cells=cells_sql("r", 4, month), rows=rows)


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


def class_cells_query(month: str) -> str:
    return _CLASS_CELLS.format(cells=cells_sql("x", 1, month))
