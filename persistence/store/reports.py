"""What reports read: the history of a period as CSV, and the inputs for explaining a
user's segments (persistence/history/ derives them)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence

from persistence import history
from persistence.store.pool import BULK_TIMEOUT_S
from persistence.store.states import UserStates
from service.domain.history import ExplainInputs


class Reports(UserStates):
    """History reports and explanations."""

    # PostgreSQL parallel workers per report query (None: the server's setting).
    report_parallel_workers: int | None = history.REPORT_PARALLEL_WORKERS

    async def history_csv(
        self,
        start: dt.datetime,
        end: dt.datetime,
        user_id: int | None,
        formula_starts: Sequence[str],
        sink: Callable[[bytes], Awaitable[None]],
        labels: tuple[str, str] = ("add", "remove"),
    ) -> None:
        """Stream what readers saw in [start, end) as ``;``-separated CSV rows, in time
        order.

        Derived from the stored facts and the segments' history (persistence/history/)
        in one snapshot: rule segments are derived user batch by user batch (replayed
        pairs to a temporary table, rule-class rows set aside in a spool), PostgreSQL
        formats and orders everything else (COPY ... TO STDOUT) with a marker at each
        rule change, and each chunk goes to ``sink`` as it arrives with the set-aside
        rows written in place of the markers, so memory stays flat however large the
        month is (a cursor with CSV formatting in Python was far slower: figures in
        docs/performance.md).  Segment cells starting with one of ``formula_starts`` get
        a leading apostrophe; ``labels`` name the operations add and remove.
        """
        # Not read-only: the derived rows go through temporary tables.
        async with self.transaction(bulk=True, isolation="repeatable_read") as conn:
            # The final sort of a month in memory (sized in docs/performance.md); larger
            # ones spill to disk.
            await conn.execute(f"SET LOCAL work_mem = '{history.REPORT_WORK_MEM}'")
            await history.write_csv(
                conn,
                start,
                end,
                user_id,
                formula_starts,
                labels,
                sink,
                copy_timeout_s=BULK_TIMEOUT_S,
                parallel_workers=self.report_parallel_workers,
            )

    async def explain_inputs(self, user_id: int) -> ExplainInputs:
        """What explaining a user's segments needs, from one snapshot."""
        async with self.transaction(isolation="repeatable_read", readonly=True) as conn:
            segments = await conn.fetch(
                "SELECT id, slug, auto_bp FROM segments WHERE deleted_at IS NULL ORDER BY slug"
            )
            version = await conn.fetchval(
                "SELECT version FROM user_versions WHERE user_id = $1", user_id
            )
            state = (await self._states(conn, [(user_id, version or 0)]))[0]
            last = await history.last_transitions(conn, user_id)
            now = await history.now_us(conn)
        return ExplainInputs(
            user_id=user_id,
            segments=[(r["id"], r["slug"], r["auto_bp"]) for r in segments],
            memberships={m.segment_id: m.expires_at for m in state.memberships},
            excluded=state.excluded,
            last={sid: (at / 1e6, add) for sid, (at, add) in last.items()},
            now=now / 1e6,
        )
