"""A hypothesis state machine over promo syncs on the real stores and the CP emulator.

Rules: replace an audience, sync (or re-sync) a promo with some end date, cancel it,
turn CP faults on and off (503s, 400s), run reconciler rounds.  After every step:

* every customer's count (as the API answers it) equals the number of promos in state
  ``synced`` that include them and have not ended, and is at most ``T``;
* for every synced promo, CP's members equal the service's record of it exactly;
* what the caller was told holds: a 200 left the promo ``synced``, an error left it
  ``failed`` (nothing counted), a cancel left it ``cancelled``;
* a customer of the audience left out of a synced promo was at the threshold;
* with CP healthy, after a reconciler round CP holds members only for synced promos.

Runs in a worker thread, each rule submitting its coroutine to the session loop (see
tests/faults/test_state_machine.py for why).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

import aiohttp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from service.bootstrap import Container
from service.domain.audiences import AudienceChange, AudienceKey
from service.domain.errors import DomainError
from tests.conftest import TABLES

T = TypeVar("T")

THRESHOLD = 2  # the test settings' SEGMENTS_SYNC_THRESHOLD
CUSTOMERS = range(1, 7)
AUDIENCES = {name: AudienceKey(9, name) for name in ("A", "B", "C")}
# Each promo belongs to one audience (a promo id is bound to its audience).
PROMOS = {"P1": "A", "P2": "A", "P3": "B", "P4": "C", "P5": "B"}

SETTINGS = settings(
    max_examples=12,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class PromoMachine(RuleBasedStateMachine):
    container: ClassVar[Container]
    loop: ClassVar[asyncio.AbstractEventLoop]
    cp: ClassVar[aiohttp.ClientSession]

    def __init__(self) -> None:
        super().__init__()
        self.c = self.container
        self.audiences: dict[str, list[int]] = {}
        # What each promo's last call told its caller: synced, failed or cancelled.
        self.told: dict[str, str] = {}
        self.fault = "none"

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_wrap(coro), self.loop).result(timeout=90)

    @initialize()
    def reset(self) -> None:
        self.run(self._reset())

    async def _reset(self) -> None:
        async with self.c.store.connection() as conn:
            await conn.execute(f"TRUNCATE {TABLES} CASCADE")
        async with self.cp.post("/_admin/reset") as r:
            assert r.status == 204
        await self.c.cache._r.flushall()
        deadline = time.monotonic() + 30
        while not await self.c.segments.rebuild_cache():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    # -- rules ------------------------------------------------------------------------

    @rule(
        name=st.sampled_from(sorted(AUDIENCES)),
        ids=st.lists(st.sampled_from(CUSTOMERS), min_size=1, max_size=5, unique=True),
    )
    def set_audience(self, name: str, ids: list[int]) -> None:
        self.run(self.c.audiences.apply(AudienceChange(AUDIENCES[name], "replace", add=ids)))
        self.audiences[name] = sorted(ids)

    @precondition(lambda self: bool(self.audiences))
    @rule(promo=st.sampled_from(sorted(PROMOS)), days=st.integers(0, 2))
    def sync(self, promo: str, days: int) -> None:
        name = PROMOS[promo]
        if name not in self.audiences:
            return
        end = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days)
        try:
            result = self.run(self.c.promos.sync(AUDIENCES[name], promo, end))
        except DomainError as exc:
            if self.told.get(promo) == "cancelled":
                assert exc.code == "promo_cancelled"
                return
            assert self.fault != "none", f"sync failed with CP healthy: {exc.code}"
            assert exc.code in ("cp_unavailable", "cp_rejected"), exc.code
            self.told[promo] = "failed"
            return
        assert self.told.get(promo) != "cancelled"
        self.told[promo] = "synced"
        members = self.run(self._members(promo))
        assert result.synced == len(members)
        assert set(members) <= set(self.audiences[name])
        assert result.skipped == len(self.audiences[name]) - len(members)
        # Everyone left out was at the threshold with other promos.
        for cid in set(self.audiences[name]) - set(members):
            others = self.run(self._slots(cid, promo))
            assert others >= THRESHOLD, (cid, others)

    @precondition(lambda self: bool(self.told))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        promo = data.draw(st.sampled_from(sorted(self.told)))
        self.run(self.c.promos.cancel(promo))
        self.told[promo] = "cancelled"

    @rule(fault=st.sampled_from(["none", "none", "503", "400"]))
    def set_fault(self, fault: str) -> None:
        body: dict[str, Any] = {}
        if fault != "none":
            body = {"error_rate": 1, "error_status": int(fault)}
        self.run(self._post_faults(body))
        self.fault = fault

    @rule()
    def reconcile(self) -> None:
        self.run(self.c.promos.reconcile())
        if self.fault == "none":
            live = self.run(self._cp_live())
            synced = self.run(self._synced_segments())
            assert set(live) <= synced, (live, synced)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def told_is_what_holds(self) -> None:
        states = self.run(self._states())
        for promo, told in self.told.items():
            assert states[promo] == told, (promo, states[promo], told)

    @invariant()
    def counts_match_synced_promos_and_stay_under_the_threshold(self) -> None:
        expected = self.run(self._expected_counts())
        for cid in CUSTOMERS:
            got = self.run(self.c.promos.sync_count(cid))
            assert got == expected.get(cid, 0), (cid, got, expected)
            assert got <= THRESHOLD

    @invariant()
    def cp_holds_exactly_the_synced_members(self) -> None:
        cp = self.run(self._cp_live())
        for promo, segment_id in self.run(self._synced_with_segment()).items():
            members = self.run(self._members(promo))
            assert cp.get(segment_id, []) == members, (promo, cp.get(segment_id), members)

    # -- helpers -----------------------------------------------------------------------

    async def _post_faults(self, body: dict[str, Any]) -> None:
        async with self.cp.post("/_admin/faults", json=body) as r:
            assert r.status == 200

    async def _cp_live(self) -> dict[str, list[int]]:
        async with self.cp.get("/_admin/state") as r:
            segments = (await r.json())["segments"]
        return {s["segment_id"]: s["member_ids"] for s in segments if s["member_ids"]}

    async def _members(self, promo: str) -> list[int]:
        async with self.c.store.connection() as conn:
            rows = await conn.fetch(
                "SELECT customer_id FROM sync_ledger WHERE promo_id = $1 ORDER BY 1", promo
            )
        return [r[0] for r in rows]

    async def _slots(self, cid: int, promo: str) -> int:
        async with self.c.store.connection() as conn:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM sync_ledger WHERE customer_id = $1"
                    " AND promo_id <> $2 AND end_date >= current_date",
                    cid,
                    promo,
                )
            )

    async def _states(self) -> dict[str, str]:
        async with self.c.store.connection() as conn:
            rows = await conn.fetch("SELECT promo_id, state FROM promo_syncs")
        return {r[0]: r[1] for r in rows}

    async def _synced_with_segment(self) -> dict[str, str]:
        async with self.c.store.connection() as conn:
            rows = await conn.fetch(
                "SELECT promo_id, cp_segment_id FROM promo_syncs"
                " WHERE state = 'synced' AND cp_segment_id IS NOT NULL"
            )
        return {r[0]: r[1] for r in rows}

    async def _synced_segments(self) -> set[str]:
        return set((await self._synced_with_segment()).values())

    async def _expected_counts(self) -> dict[int, int]:
        async with self.c.store.connection() as conn:
            rows = await conn.fetch(
                "SELECT l.customer_id, count(*) FROM sync_ledger l"
                " JOIN promo_syncs p USING (promo_id)"
                " WHERE p.state = 'synced' AND l.end_date >= current_date"
                " GROUP BY l.customer_id"
            )
            # Nothing else may be counted or held: no attempt is in flight between steps.
            stray = await conn.fetchval(
                "SELECT count(*) FROM sync_ledger l JOIN promo_syncs p USING (promo_id)"
                " WHERE p.state <> 'synced' OR l.state <> 'active'"
            )
        assert stray == 0
        return {r[0]: r[1] for r in rows}


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro


async def test_promo_state_machine(clean: Container, cp: aiohttp.ClientSession) -> None:
    machine = type(
        "BoundPromoMachine",
        (PromoMachine,),
        {"container": clean, "loop": asyncio.get_running_loop(), "cp": cp},
    )
    started = time.monotonic()
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)
    assert time.monotonic() - started < 120
