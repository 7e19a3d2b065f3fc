"""History reports from PostgreSQL: stored facts and segment rules -> what readers saw.

The derivation itself is pure (``service/domain/history.py``); this package reads what
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

The classes' rows once went through temporary tables into one sort of all the rows,
after the hashing, which was much slower (figures in docs/performance.md); see
``write_csv`` for what each step saves.

The package: ``queries`` (the SQL text, the cells' formatting), ``derive`` (step 1:
timelines, replay, classes; ``last_transitions`` for explanations), ``spool`` (what a
report sets aside), ``markers`` (step 2: the classes' rows at the markers), ``report``
(``write_csv``).
"""

from persistence.history.derive import (
    CLASSIFY_SLICE,
    REPLAY_SLICE,
    DerivedRow,
    derive,
    last_transitions,
    now_us,
    replay,
    timelines,
)
from persistence.history.queries import Conn, from_us, to_us
from persistence.history.report import (
    REPORT_BATCH,
    REPORT_PARALLEL_TUPLE_COST,
    REPORT_PARALLEL_WORKERS,
    REPORT_WORK_MEM,
    write_csv,
)
from persistence.history.spool import SPOOL_MEMORY, SPOOL_PIECE

__all__ = [
    "CLASSIFY_SLICE",
    "REPLAY_SLICE",
    "REPORT_BATCH",
    "REPORT_PARALLEL_TUPLE_COST",
    "REPORT_PARALLEL_WORKERS",
    "REPORT_WORK_MEM",
    "SPOOL_MEMORY",
    "SPOOL_PIECE",
    "Conn",
    "DerivedRow",
    "derive",
    "from_us",
    "last_transitions",
    "now_us",
    "replay",
    "timelines",
    "to_us",
    "write_csv",
]
