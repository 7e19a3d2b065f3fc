"""Gauges read from PostgreSQL: the outboxes' backlog (set by the reconciler) and the
number of users a cache rebuild goes through (set when one starts, in any process).

The queries are cheap and bounded: counting stops at ``OUTBOX_COUNT_CAP`` rows, the
oldest row comes from the ``created_at`` index, and a large ``user_versions`` is
estimated from the planner's statistics rather than counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from persistence.store import PgStore
from service.domain.errors import StorageUnavailable
from service.domain.ports import StoreFigures
from service.observability import OUTBOX_AGE, OUTBOX_ROWS, REBUILD_EXPECTED, REBUILD_WRITTEN

log = logging.getLogger(__name__)

OUTBOX_COUNT_CAP = 1_000_000

# Both outboxes: rows (up to the cap) and the age of the oldest row, in seconds (0 when
# empty).  cache_outbox: user changes whose Redis write the reconciler confirms (rows
# live about a second when all is well); counter_outbox: sync counts not yet in Redis.
_OUTBOXES = """
SELECT 'cache' AS outbox,
       (SELECT count(*) FROM (SELECT 1 FROM cache_outbox LIMIT $1) s) AS n,
       coalesce(extract(epoch FROM now() - (SELECT min(created_at) FROM cache_outbox)), 0)
           ::float8 AS age
UNION ALL
SELECT 'counter',
       (SELECT count(*) FROM (SELECT 1 FROM counter_outbox LIMIT $1) s),
       coalesce(extract(epoch FROM now() - (SELECT min(created_at) FROM counter_outbox)), 0)
           ::float8
"""

# Users PostgreSQL knows: counted below a million rows, estimated above (reltuples is
# -1 before the table was first analysed: then counted too).
_USERS = """
SELECT CASE WHEN c.reltuples >= 1000000 THEN c.reltuples::bigint
            ELSE (SELECT count(*) FROM user_versions) END
FROM pg_class c WHERE c.oid = 'user_versions'::regclass
"""


class PgFigures:
    """``StoreFigures`` read from a ``PgStore``."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    async def count_users(self) -> int:
        async with self._store.connection() as conn:
            return int(await conn.fetchval(_USERS))

    async def outbox_backlog(self) -> dict[str, tuple[int, float]]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(_OUTBOXES, OUTBOX_COUNT_CAP)
        return {row["outbox"]: (row["n"], max(0.0, row["age"])) for row in rows}

    def pool_counts(self) -> dict[str, int]:
        store = self._store
        return {
            "acquire_timeouts": store.acquire_timeouts,
            "conflict": store.change_conflicts,
            "locked": store.locked_changes,
            "turn_timeout": store.turn_timeouts,
            "in_use": store.in_use,
            "in_use_peak": store.in_use_peak,
            "waiting": store.waiting,
            "max_size": store.max_size,
        }


async def set_outbox_gauges(figures: StoreFigures) -> None:
    for outbox, (rows, age) in (await figures.outbox_backlog()).items():
        OUTBOX_ROWS.labels(outbox).set(rows)
        OUTBOX_AGE.labels(outbox).set(age)


def rebuild_progress(
    figures: StoreFigures, count_timeout_s: float = 1.0
) -> Callable[[int], Awaitable[None]]:
    """``SegmentService.rebuild_progress`` for the rebuild gauges.  Counting the users
    when a rebuild starts delays it by at most ``count_timeout_s``; a count that fails
    or takes longer leaves the total as it was."""

    async def progress(users: int) -> None:
        REBUILD_WRITTEN.set(users)
        if users:
            return
        try:
            async with asyncio.timeout(count_timeout_s):
                total = await figures.count_users()
        except (StorageUnavailable, TimeoutError) as exc:
            log.info("cache rebuild: users not counted (%s)", exc or "timed out")
            return
        except Exception:  # a gauge must never stop the rebuild
            log.exception("cache rebuild: users not counted")
            return
        REBUILD_EXPECTED.set(total)

    return progress
