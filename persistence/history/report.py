"""The history report's CSV (``write_csv``): step 1 (``derive``), then PostgreSQL's COPY
with the classes' rows written at the markers (``markers``)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from persistence.history.derive import Classes, now_us, replay_all, timelines
from persistence.history.markers import Instants, Markers
from persistence.history.queries import (
    TEMP_TABLES,
    Conn,
    at_instants_query,
    class_cells_query,
    csv_query,
    formula_codes,
    from_us,
    month_prefix,
    to_us,
)
from persistence.history.spool import copy_out, copy_to, csv_lines, spooled
from service.domain.history import rule_classes

# Known users per batch of a month-wide report: bounds the memory of a batch (its
# facts, what is derived for it).
REPORT_BATCH = 100_000

# work_mem of a report's transaction: the final query's sorts, one per parallel process
# (their size in docs/performance.md).
REPORT_WORK_MEM = "128MB"

# The final query's cost of a row passed between parallel processes (write_csv).
REPORT_PARALLEL_TUPLE_COST = 0.01

# PostgreSQL parallel workers per query of a report (SEGMENTS_REPORT_PARALLEL_WORKERS).
# None: the server's max_parallel_workers_per_gather.  On a small machine the workers
# take the cores the API's reads need (docs/performance.md).
REPORT_PARALLEL_WORKERS: int | None = 0


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
    parallel_workers: int | None = REPORT_PARALLEL_WORKERS,
) -> None:
    """The report's CSV rows (no header) in time order, from one snapshot (the package's
    docstring says how).

    What saves time, each part measured with bench/report_history.py (figures in
    docs/performance.md, "Figures behind the code"): the classes' rows written at the
    markers rather than through temporary tables into PostgreSQL's sort and formatting,
    the users hashed from PostgreSQL's text (``history.Members``); parallel workers
    formatting and sorting the stored facts; cheaper cells (``cells_sql``).  Tried and
    not kept, as no faster: handing the sink 256 kB at a time, hashing while PostgreSQL
    sorts, a streaming plan (and with it the first marker would wait for the hashing).
    """
    if parallel_workers is not None:
        await conn.execute(f"SET LOCAL max_parallel_workers_per_gather = {int(parallel_workers)}")
    now = await now_us(conn)
    start_us, end_us = to_us(start), to_us(end)
    rules = {
        sid: t for sid, t in (await timelines(conn)).items() if t.has_rule_during(start_us, end_us)
    }
    classes = Classes.of({sid: rule_classes(t, start_us, end_us, now) for sid, t in rules.items()})
    await conn.execute(TEMP_TABLES)
    month = month_prefix(start)
    user: list[Any] = [] if user_id is None else [user_id]
    async with spooled() as spool:
        batches = []
        if rules:
            batches = await replay_all(
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
        period: list[Any] = [start, end, list(rules), formula_codes(formula_starts), *labels]
        period += [[from_us(t) for t in classes.instants], classes.instants]
        instants: Instants | None = None
        if classes.keys:
            await _class_cells(conn, classes, month, formula_starts, labels, copy_timeout_s)
            keys = [[i + 1 for i, _, _ in classes.keys], [sid for _, sid, _ in classes.keys]]
            theirs = await copy_to(
                spool,
                conn,
                at_instants_query(user_id, month),
                [*period, *keys, *user],
                copy_timeout_s,
            )
            instants = Instants(sink, spool, batches, classes, theirs)
        # Parallel workers format and sort the stored facts (at PostgreSQL's default
        # cost of a row passed between processes, 0.1, the plan stays serial), which
        # made the report faster (figures in docs/performance.md).
        await conn.execute(f"SET LOCAL parallel_tuple_cost = {REPORT_PARALLEL_TUPLE_COST}")
        token = secrets.token_hex(16)
        markers = Markers(sink, token.encode(), instants)
        await conn.copy_from_query(
            csv_query(user_id, month),
            *period,
            token,
            *user,
            output=markers.feed,
            format="csv",
            delimiter=";",
            timeout=copy_timeout_s,
        )
        await markers.close()


async def _class_cells(
    conn: Conn,
    classes: Classes,
    month: str,
    formula_starts: Sequence[str],
    labels: tuple[str, str],
    timeout_s: float | None,
) -> None:
    """Each key's cells after the user id, as the CSV writes them, and the order of the
    keys' slugs at each instant (the database's collation)."""
    lines = await copy_out(
        conn,
        class_cells_query(month),
        [
            formula_codes(formula_starts),
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
    for line in csv_lines(lines):
        k_text, cells = line.split(b";", 1)
        k = int(k_text)
        keys = classes.at[classes.keys[k][0]]
        keys.append(k)
        classes.rank[k] = len(keys)
        classes.cells[k] = cells[cells.index(b";") :]
