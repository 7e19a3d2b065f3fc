"""Scenario 8: a hypothesis state machine over the real stores.

API writes, Kafka-style audience messages (with redeliveries), TTL expiry, Redis
flushes, segment deletion and reconciles interleave in any order.  The invariants:
every read equals the model after every step, and after a reconcile Redis holds
exactly what PostgreSQL holds (same version per user, same live memberships).

Running it: hypothesis' state machine is synchronous, while the service and the
session fixtures live on pytest-asyncio's session loop.  The test therefore runs the
machine in a worker thread (``asyncio.to_thread``) and each rule submits its
coroutine back to the session loop with ``run_coroutine_threadsafe``; the loop is
free meanwhile (it is only awaiting the thread), so background tasks the service
starts itself (the rebuild after a flush) run on their own loop, interleaved with
the rules, as in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

import pytest
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
from service.domain.errors import SegmentExists, SegmentNotFound
from service.domain.service import AddRequest
from service.ingest.messages import AudienceMessage, InvalidMessage, decode, encode
from tests.conftest import TABLES

T = TypeVar("T")

USERS = range(1, 9)
SLUGS = ("S1", "S2", "S3", "S4")
# Only these may be deleted (and recreated), so most writes still name live segments.
DELETABLE = ("S3", "S4")
AUDIENCE = AudienceKey(5, "SM")
TOPIC = "state-machine"
MAX_IDS = 1000
TTL_S = 1
# A TTL membership must be visible until (start of its write + TTL - margin) and gone
# after (end of its write + TTL + margin); in between either answer is right.
MARGIN_S = 0.2

SETTINGS = settings(
    max_examples=20,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

slugs_st = st.lists(st.sampled_from(SLUGS), unique=True, max_size=3)
message_st = st.tuples(
    st.sampled_from(["add", "remove", "replace", "invalid"]),
    st.lists(st.integers(1, 10), unique=True, max_size=4),
)


class SegmentsMachine(RuleBasedStateMachine):
    """Bound to a container and the session loop by the test (see ``_bind``)."""

    container: ClassVar[Container]
    loop: ClassVar[asyncio.AbstractEventLoop]

    def __init__(self) -> None:
        super().__init__()
        self.c = self.container
        # user -> slugs it is in without expiry.
        self.members: dict[int, set[str]] = {u: set() for u in USERS}
        # user -> slug -> (earliest, latest) expiry of a TTL membership.
        self.expiring: dict[int, dict[str, tuple[float, float]]] = {u: {} for u in USERS}
        self.live_slugs: set[str] = set()
        self.audience: set[int] = set()
        self.audience_seen = False  # has any change reached the audience yet?
        self.next_offset = 0
        self.last_batch: list[tuple[int, AudienceChange | None]] = []
        self.reconciles = 0

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_wrap(coro), self.loop).result(timeout=90)

    # -- set-up ---------------------------------------------------------------

    @initialize()
    def reset(self) -> None:
        self.run(self._reset())
        self.live_slugs = set(SLUGS)

    async def _reset(self) -> None:
        await _quiesce(self.c)
        async with self.c.store.connection() as conn:
            await conn.execute(f"TRUNCATE {TABLES} CASCADE")
        await self.c.cache._r.flushall()
        deadline = time.monotonic() + 30
        while not await self.c.segments.rebuild_cache():
            assert time.monotonic() < deadline, "the reset's rebuild never got the lease"
            await asyncio.sleep(0.05)
        for slug in SLUGS:
            await self.c.segments.create_segment(slug)

    # -- the model ------------------------------------------------------------

    def _prune(self, now: float) -> None:
        for per_user in self.expiring.values():
            for slug in [s for s, (_, late) in per_user.items() if now > late + MARGIN_S]:
                del per_user[slug]

    def _check_user(self, uid: int, seen: list[str], now: float) -> None:
        certain = set(self.members[uid])
        maybe: set[str] = set()
        for slug, (early, late) in self.expiring[uid].items():
            if now < early - MARGIN_S:
                certain.add(slug)
            elif now <= late + MARGIN_S:
                maybe.add(slug)
        assert seen == sorted(seen), f"user {uid}: answer not sorted: {seen}"
        got = set(seen)
        assert got - maybe == certain, f"user {uid}: read {seen}, model {sorted(certain)}"

    # -- API writes -----------------------------------------------------------

    @rule(uid=st.sampled_from(USERS), add=slugs_st, remove=slugs_st)
    def update_user(self, uid: int, add: list[str], remove: list[str]) -> None:
        remove = [s for s in remove if s not in add]
        named = set(add) | set(remove)
        if not named <= self.live_slugs:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.update_user(uid, [AddRequest(s) for s in add], remove))
            return  # all-or-nothing: the model is unchanged
        seen = self.run(self.c.segments.update_user(uid, [AddRequest(s) for s in add], remove))
        for slug in named:
            self.expiring[uid].pop(slug, None)
        self.members[uid] |= set(add)
        self.members[uid] -= set(remove)
        self._check_user(uid, seen, time.time())

    # Two narrower writers besides the mixed one: hypothesis picks among rules (and
    # switches some off per run), so this keeps plain writes the most common step.
    @rule(uid=st.sampled_from(USERS), add=slugs_st.filter(bool))
    def add_segments(self, uid: int, add: list[str]) -> None:
        self.update_user(uid, add, [])

    @rule(uid=st.sampled_from(USERS), remove=slugs_st.filter(bool))
    def remove_segments(self, uid: int, remove: list[str]) -> None:
        self.update_user(uid, [], remove)

    @rule(uid=st.sampled_from(USERS), slug=st.sampled_from(SLUGS))
    def add_with_ttl(self, uid: int, slug: str) -> None:
        request = [AddRequest(slug, ttl_seconds=TTL_S)]
        if slug not in self.live_slugs:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.update_user(uid, request, []))
            return
        before = time.time()
        seen = self.run(self.c.segments.update_user(uid, request, []))
        after = time.time()
        self.members[uid].discard(slug)
        self.expiring[uid][slug] = (before + TTL_S, after + TTL_S)
        self._check_user(uid, seen, after)

    @precondition(lambda self: any(self.expiring.values()))
    @rule(sweep=st.booleans())
    def let_ttls_expire(self, sweep: bool) -> None:
        """Wait until every TTL membership has certainly expired (reads must drop it
        by themselves); then maybe run the sweeper, which must not change any read."""
        latest = max(late for per_user in self.expiring.values() for _, late in per_user.values())
        time.sleep(max(0.0, latest + MARGIN_S + 0.05 - time.time()))
        self._prune(time.time())
        assert not any(self.expiring.values())
        if sweep:
            self.run(self.c.segments.sweep_expired())

    @rule(slug=st.sampled_from(DELETABLE))
    def delete_segment(self, slug: str) -> None:
        if slug not in self.live_slugs:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.delete_segment(slug))
            return
        self.run(self.c.segments.delete_segment(slug))
        self.live_slugs.discard(slug)
        for uid in USERS:
            self.members[uid].discard(slug)
            self.expiring[uid].pop(slug, None)

    @rule(slug=st.sampled_from(DELETABLE))
    def recreate_segment(self, slug: str) -> None:
        if slug in self.live_slugs:
            with pytest.raises(SegmentExists):
                self.run(self.c.segments.create_segment(slug))
            return
        # A new segment under an old slug starts empty: nobody inherits the old one.
        self.run(self.c.segments.create_segment(slug))
        self.live_slugs.add(slug)

    # -- Redis loses everything ------------------------------------------------

    @rule()
    def flush_redis(self) -> None:
        self.run(self.c.cache._r.flushall())

    # -- Kafka audiences --------------------------------------------------------

    @rule(messages=st.lists(message_st, min_size=1, max_size=3))
    def kafka_batch(self, messages: list[tuple[str, list[int]]]) -> None:
        batch: list[tuple[int, AudienceChange | None]] = []
        expected_applied = 0
        for op, ids in messages:
            batch.append((self.next_offset, _change(op, ids, self.next_offset)))
            self.next_offset += 1
            if op == "invalid":
                continue  # set aside (dead-lettered): only the offset moves
            expected_applied += 1
            self.audience_seen = True
            if op == "add":
                self.audience |= set(ids)
            elif op == "remove":
                self.audience -= set(ids)
            else:
                self.audience = set(ids)
        applied = self.run(self.c.audiences.apply_kafka(TOPIC, 0, batch))
        assert applied == expected_applied
        self.last_batch = batch
        self.run(self._check_audience())

    @precondition(lambda self: bool(self.last_batch))
    @rule()
    def redeliver_last_batch(self) -> None:
        before = self.run(self._audience_version())
        assert self.run(self.c.audiences.apply_kafka(TOPIC, 0, self.last_batch)) == 0
        assert self.run(self._audience_version()) == before, "a redelivery changed the audience"
        self.run(self._check_audience())

    @precondition(lambda self: bool(self.last_batch))
    @rule(ids=st.lists(st.integers(1, 10), unique=True, min_size=1, max_size=3))
    def redeliver_with_a_new_message(self, ids: list[int]) -> None:
        """A rebalance: the last batch comes again, followed by one new message."""
        new = (self.next_offset, _change("add", ids, self.next_offset))
        self.next_offset += 1
        batch = [*self.last_batch, new]
        assert self.run(self.c.audiences.apply_kafka(TOPIC, 0, batch)) == 1
        self.audience |= set(ids)
        self.audience_seen = True
        self.last_batch = batch
        self.run(self._check_audience())

    async def _audience_version(self) -> int | None:
        info = await self.c.audience_store.get(AUDIENCE)
        return None if info is None else info.version

    async def _check_audience(self) -> None:
        info = await self.c.audience_store.get(AUDIENCE)
        if not self.audience_seen:
            assert info is None
            return
        assert info is not None
        assert info.customers == len(self.audience), (info.customers, sorted(self.audience))
        async with self.c.store.connection() as conn:
            rows = await conn.fetch(
                "SELECT m.customer_id FROM audience_members m JOIN audiences a USING (generation)"
                " WHERE a.merchant_id = $1 AND a.segment_type = $2",
                AUDIENCE.merchant_id,
                AUDIENCE.segment_type,
            )
        assert {r[0] for r in rows} == self.audience

    # -- reconcile --------------------------------------------------------------

    @rule()
    def reconcile(self) -> None:
        self.run(self._reconcile())
        self.reconciles += 1

    async def _reconcile(self) -> None:
        c = self.c
        deadline = time.monotonic() + 30
        while not await c.segments.cache_complete():
            assert time.monotonic() < deadline, "cache was not rebuilt in time"
            await c.reconciler.step()
            if not await c.segments.cache_complete():
                await asyncio.sleep(0.02)  # another rebuild (the service's own) holds the lease
        await c.reconciler.drain_outbox(min_age_s=0)
        await c.reconciler.scan(recheck_after_s=0)
        again = await c.reconciler.scan(recheck_after_s=0)
        assert again.found == 0, f"a second scan still found {again.found} users behind"
        await self._check_redis_equals_postgres()

    async def _check_redis_equals_postgres(self) -> None:
        c = self.c
        assert await c.segments.cache_complete()
        rows = await c.store.scan_versions(0, 100)
        cached = await c.cache.versions([uid for uid, _, _ in rows])
        registry = await c.store.registry()
        for (uid, version, live), rv in zip(rows, cached, strict=True):
            if live:
                assert rv == version, f"user {uid}: Redis at version {rv}, PostgreSQL {version}"
            else:
                # Nothing to show: no key at all, or one at PostgreSQL's version.
                assert rv in (None, version), f"user {uid}: Redis {rv}, PostgreSQL {version}"
            now = time.time()
            state = await c.store.user_state(uid)
            in_pg = {m.segment_id for m in state.memberships if m.expires_at > now}
            user = await c.cache.read_user(uid, now)
            assert user is not None, "the cache lost its completeness marker"
            # Redis may still hold ids of deleted segments (readers drop them).
            in_redis = {sid for sid in user.member_ids if sid in registry.segments}
            assert in_redis == in_pg, f"user {uid}: Redis {in_redis}, PostgreSQL {in_pg}"

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def reads_equal_the_model(self) -> None:
        if not self.live_slugs:
            return  # before initialize
        answers = self.run(self._read_all())
        now = time.time()
        for uid, seen in answers.items():
            self._check_user(uid, seen, now)
        self._prune(now)

    async def _read_all(self) -> dict[int, list[str]]:
        return {uid: await self.c.segments.user_segments(uid) for uid in USERS}

    def teardown(self) -> None:
        # Every run ends with a reconcile and the full check, whatever came before.
        if self.live_slugs:
            self.run(self._reconcile())
            self.run(_quiesce(self.c))


def _change(op: str, ids: list[int], offset: int) -> AudienceChange | None:
    """Decode a message exactly as the consumer does; None if it is set aside."""
    msg = AudienceMessage(
        merchant_id=AUDIENCE.merchant_id,
        segment_type=AUDIENCE.segment_type,
        op="add" if op == "invalid" else op,  # type: ignore[arg-type]
        customer_ids=[0, *ids] if op == "invalid" else ids,  # 0 is not a customer id
        batch_id=f"b{offset}",
    )
    try:
        return decode(*encode(msg), MAX_IDS)
    except InvalidMessage:
        assert op == "invalid"
        return None


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro


async def _quiesce(c: Container) -> None:
    """Let the service's own background work (a rebuild started by a read of an
    incomplete cache, a repair) finish, so it cannot write into the next example."""
    segments: Any = c.segments
    for task in (segments._rebuild_task, segments._repair_task):
        if task is not None and not task.done():
            await task


def _bind(container: Container, loop: asyncio.AbstractEventLoop) -> type[SegmentsMachine]:
    return type("BoundSegmentsMachine", (SegmentsMachine,), {"container": container, "loop": loop})


async def test_state_machine(clean: Container) -> None:
    machine = _bind(clean, asyncio.get_running_loop())
    started = time.monotonic()
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)
    assert time.monotonic() - started < 120
