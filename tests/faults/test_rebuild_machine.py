"""A hypothesis state machine over a cache rebuild in progress (docs/cache-format.md,
"Completeness"): reads of users at or below the progress mark come from Redis, the
others from PostgreSQL, and either way they must equal what PostgreSQL holds.

Rebuilds are driven step by step through the Cache and Store ports, as
``CacheCopy.rebuild_cache`` drives them (take the lease and write the registry; read
a batch in one snapshot; renew the lease; write the batch and set the mark; finish),
so API writes, write-throughs that land late, Redis flushes, segment deletions, clock
moves and other rebuilds fall between any two of those steps.  Besides them, the real
``rebuild_cache`` runs in the background, paused at each batch by its progress hook.

Invariants: after every step every read (one user, many users; the writing process
and another one) equals the model, except for users whose last change is committed
but not yet written through (not acknowledged yet); after a rebuild finishes, Redis
holds what PostgreSQL holds.  The machine runs in a worker thread and submits each
rule to the session loop, as tests/faults/test_state_machine.py does.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar, cast

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

from cache.redis_cache import RedisCache
from service.bootstrap import Container
from service.domain.errors import SegmentNotFound
from service.domain.model import UserState
from service.domain.service import AddRequest, SegmentService
from tests.conftest import TABLES

T = TypeVar("T")

USERS = range(1, 33)
SLUGS = ("A", "B", "C")
DELETABLE = ("C",)
BATCH = 4
LEASE_S = 30.0
TTLS_S = (3, 20)
# Clock moves: never a whole number of seconds, and an expiry that still falls within
# this of the read's clock is not checked (PostgreSQL keeps microseconds).
CLOCK_STEPS_S = (1.5, 7.25, 25.5)
EDGE_S = 0.01

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

slugs_st = st.lists(st.sampled_from(SLUGS), unique=True, max_size=2)
# Writes go to a few users more often than to the rest, so one user sees several
# changes (a held write-through overtaken by a later one) within an example.
HOT = (2, 7)
users_st = st.one_of(st.sampled_from(HOT), st.sampled_from(USERS))

# Over all examples: reads answered from Redis behind a progress mark while the copy
# was incomplete, and answered from PostgreSQL meanwhile (the test asserts both).
SEEN = {"redis_while_rebuilding": 0, "postgres_while_rebuilding": 0, "finished": 0}


@dataclass
class StepRebuild:
    """A rebuild driven rule by rule, as one process's ``rebuild_cache`` would be."""

    generation: str
    batches: AsyncIterator[list[UserState]]
    batch: list[UserState] | None = None
    renewed: bool = False
    read_all: bool = False


@dataclass
class RealRebuild:
    """``rebuild_cache`` in the background, stopped at each progress call until told
    to go on."""

    service: SegmentService
    go: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[bool] | None = None

    def start(self) -> None:
        self.service.rebuild_progress = self._progress
        self.task = asyncio.create_task(self.service.rebuild_cache())

    async def _progress(self, users: int) -> None:
        self.paused.set()
        await self.go.acquire()

    async def wait(self) -> None:
        """Until it stops at its next batch or ends."""
        assert self.task is not None
        stopped = asyncio.create_task(self.paused.wait())
        done, _ = await asyncio.wait(
            {stopped, self.task}, timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        assert done, "the rebuild neither paused nor ended within 30 s"

    async def step(self) -> None:
        self.paused.clear()
        self.go.release()
        await self.wait()

    async def stop(self) -> None:
        assert self.task is not None
        while not self.task.done():
            self.go.release()
            await asyncio.sleep(0.005)


class Deferred(SegmentService):
    """A writer whose write-through is held back until the machine lets it land (a
    slow process, or one whose Redis write waits behind others)."""

    held: list[UserState]

    async def _write_through(self, states: Sequence[UserState]) -> None:
        self.held.extend(states)


class RebuildMachine(RuleBasedStateMachine):
    """Bound to a container and the session loop by the test (see ``_bind``)."""

    container: ClassVar[Container]
    loop: ClassVar[asyncio.AbstractEventLoop]

    def __init__(self) -> None:
        super().__init__()
        self.c = self.container
        self.cache = cast(RedisCache, self.c.cache)
        self.store = self.c.store
        self.offset = 0.0
        self.base = time.time()
        # user -> slug -> expiry (inf: none) as PostgreSQL holds it.
        self.model: dict[int, dict[str, float]] = {u: {} for u in USERS}
        self.live_slugs: set[str] = set()
        # user -> version of a committed change not written through yet.
        self.unacked: dict[int, int] = {}
        self.rebuilds: list[StepRebuild] = []
        self.real: RealRebuild | None = None
        self.started = False

    def clock(self) -> float:
        return self.base + self.offset

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_wrap(coro), self.loop).result(timeout=90)

    def _service(self, cls: type[SegmentService] = SegmentService) -> SegmentService:
        svc = cls(self.store, self.cache, clock=self.clock, rebuild_batch=BATCH)
        # Rebuilds are the machine's to start: a read of an incomplete copy asks for
        # one, and this keeps such reads from starting it.
        svc._next_rebuild_at = math.inf
        return svc

    # -- set-up -----------------------------------------------------------------

    @initialize(seed=st.lists(slugs_st, min_size=len(USERS), max_size=len(USERS)))
    def reset(self, seed: list[list[str]]) -> None:
        self.writer = self._service()
        self.reader = self._service()  # another process: its own registry
        self.slow = self._service(Deferred)
        assert isinstance(self.slow, Deferred)
        self.slow.held = []
        self.run(self._reset(seed))
        self.live_slugs = set(SLUGS)
        self.started = True

    async def _reset(self, seed: list[list[str]]) -> None:
        async with self.store.connection() as conn:
            await conn.execute(f"TRUNCATE {TABLES} CASCADE")
        await self.cache._r.flushall()
        for slug in SLUGS:
            await self.writer.create_segment(slug)
        for uid, slugs in zip(USERS, seed, strict=True):
            if slugs:
                await self.writer.update_user(uid, [AddRequest(s) for s in slugs], [])
                self.model[uid] = dict.fromkeys(slugs, math.inf)
        assert await self._full_rebuild()

    async def _full_rebuild(self) -> bool:
        rebuilder = SegmentService(self.store, self.cache, clock=self.clock, rebuild_batch=BATCH)
        deadline = time.monotonic() + 40  # a lease left by a lost rebuild lasts LEASE_S
        while time.monotonic() < deadline:
            if await rebuilder.rebuild_cache():
                return True
            await asyncio.sleep(0.1)
        return False

    # -- the model ---------------------------------------------------------------

    def _expected(self, uid: int, now: float) -> tuple[set[str], set[str]]:
        """(slugs the read must show, slugs it may show: an expiry at the edge)."""
        certain: set[str] = set()
        maybe: set[str] = set()
        for slug, expires_at in self.model[uid].items():
            if expires_at > now + EDGE_S:
                certain.add(slug)
            elif expires_at > now - EDGE_S:
                maybe.add(slug)
        return certain, maybe

    def _check(self, uid: int, seen: list[str], now: float, where: str) -> None:
        if uid in self.unacked:
            return  # its last change is not acknowledged: either answer is right
        certain, maybe = self._expected(uid, now)
        assert seen == sorted(seen), f"{where}: user {uid}: answer not sorted: {seen}"
        assert set(seen) - maybe == certain, (
            f"{where}: user {uid} read {seen}, PostgreSQL holds {sorted(certain)}"
        )

    def _applied(self, uid: int, add: list[str], remove: list[str], ttl: int | None) -> None:
        expires_at = math.inf if ttl is None else self.clock() + ttl
        for slug in remove:
            self.model[uid].pop(slug, None)
        for slug in add:
            self.model[uid][slug] = expires_at

    # -- writes ------------------------------------------------------------------

    @rule(
        uid=users_st,
        add=slugs_st,
        remove=slugs_st,
        ttl=st.sampled_from((None, None, *TTLS_S)),
        leave_all=st.booleans(),
        held=st.booleans(),
    )
    def write(
        self,
        uid: int,
        add: list[str],
        remove: list[str],
        ttl: int | None,
        leave_all: bool,
        held: bool,
    ) -> None:
        """A change through the service.  ``leave_all``: the user leaves every segment
        (users left with nothing are the ones a rebuild does not write).  ``held``: the
        change commits but its write-through waits until the machine lets it land (a
        slow process, or a write queued behind others), so it is not acknowledged."""
        if leave_all:
            add, remove = [], sorted(set(self.model[uid]) & self.live_slugs)
        remove = [s for s in remove if s not in add]
        request = [AddRequest(s, ttl_seconds=ttl) for s in add]
        writer = self.slow if held else self.writer
        if not set(add) | set(remove) <= self.live_slugs:
            with pytest.raises(SegmentNotFound):
                self.run(writer.update_user(uid, request, remove))
            return
        seen = self.run(writer.update_user(uid, request, remove))
        self._applied(uid, add, remove, ttl)
        if held:
            assert isinstance(self.slow, Deferred)
            self.unacked[uid] = self.slow.held[-1].version
            return
        self.unacked.pop(uid, None)  # acknowledged, and newer than any held write
        self._check(uid, seen, self.clock(), "write's answer")

    @precondition(lambda self: isinstance(self.slow, Deferred) and bool(self.slow.held))
    @rule(pick=st.integers(0, 100))
    def land_held_write(self, pick: int) -> None:
        """A held write-through lands, in any order (an older one may land after a
        newer write of the same user)."""
        assert isinstance(self.slow, Deferred)
        state = self.slow.held.pop(pick % len(self.slow.held))
        self.run(self.cache.write_users([state]))
        if self.unacked.get(state.user_id) == state.version:
            del self.unacked[state.user_id]

    @rule(slug=st.sampled_from(DELETABLE), again=st.booleans())
    def delete_segment(self, slug: str, again: bool) -> None:
        """Delete the segment (its memberships end), maybe create it again at once (a
        new segment: nobody is in it)."""
        if slug not in self.live_slugs:
            self.run(self.writer.create_segment(slug))
            self.live_slugs.add(slug)
            return
        self.run(self.writer.delete_segment(slug))
        self.live_slugs.discard(slug)
        for uid in USERS:
            self.model[uid].pop(slug, None)
        if again:
            self.run(self.writer.create_segment(slug))
            self.live_slugs.add(slug)

    @rule(step=st.sampled_from(CLOCK_STEPS_S))
    def advance_clock(self, step: float) -> None:
        self.offset += step

    # -- Redis loses things --------------------------------------------------------

    @rule(land=st.booleans())
    def flushall(self, land: bool) -> None:
        """A flush (or a restart with no data); maybe the held write-throughs land just
        after it, as writes waiting on a Redis that went away do when it is back."""
        self.run(self.cache._r.flushall())
        assert isinstance(self.slow, Deferred)
        while land and self.slow.held:
            self.land_held_write(0)

    @rule()
    def invalidate(self) -> None:
        """What the reconciler does on finding a restarted server."""
        self.run(self.cache.invalidate())

    # -- rebuilds driven step by step --------------------------------------------

    @precondition(lambda self: len(self.rebuilds) < 3)
    @rule(steps=st.integers(0, 12))
    def begin(self, steps: int) -> None:
        """A rebuild starts (unless another holds the lease) and takes its first
        ``steps`` steps."""
        if self.run(self._begin()) and steps:
            self.advance(len(self.rebuilds) - 1, steps)

    async def _begin(self) -> bool:
        generation = await self.cache.begin_rebuild(LEASE_S)
        if generation is None:
            return False  # another rebuild holds the lease
        await self.cache.write_registry(await self.store.registry())
        # After the mark of an interrupted rebuild, when no flush came since.
        resume = await self.cache.resume_point(generation)
        self.rebuilds.append(StepRebuild(generation, self.store.user_states(BATCH, resume)))
        return True

    @precondition(lambda self: bool(self.rebuilds))
    @rule(pick=st.integers(0, 2), steps=st.integers(1, 12))
    def advance(self, pick: int, steps: int) -> None:
        """The next ``steps`` steps of one rebuild, with nothing in between."""
        rebuild = self.rebuilds[pick % len(self.rebuilds)]
        for _ in range(steps):
            if not self.run(self._step(rebuild)):
                return

    async def _step(self, r: StepRebuild) -> bool:
        """One step of ``r``; False when it is over."""
        if r.batch is None and not r.read_all:
            # One statement, one snapshot per batch.
            r.batch = await anext(r.batches, None)
            r.read_all = r.batch is None
            return True
        if r.batch is not None and not r.renewed:
            if not await self.cache.renew_rebuild(r.generation, LEASE_S):
                self.rebuilds.remove(r)  # lost: another process continues
                return False
            r.renewed = True
            return True
        if r.batch is not None:
            await self.cache.write_users(r.batch)
            await self.cache.mark_rebuilt(r.generation, r.batch[-1].user_id)
            r.batch, r.renewed = None, False
            return True
        self.rebuilds.remove(r)
        if await self.cache.finish_rebuild(r.generation):
            SEEN["finished"] += 1
            await self._check_copy()
        return False

    @precondition(lambda self: bool(self.rebuilds))
    @rule(pick=st.integers(0, 2))
    def give_up(self, pick: int) -> None:
        """A rebuild that failed releases its lease."""
        rebuild = self.rebuilds.pop(pick % len(self.rebuilds))
        self.run(self.cache.release_rebuild(rebuild.generation))

    # -- the real rebuild, paused at each batch ------------------------------------

    @precondition(lambda self: self.real is None)
    @rule()
    def start_real_rebuild(self) -> None:
        self.real = RealRebuild(self._service())
        self.run(self._start_real(self.real))

    async def _start_real(self, real: RealRebuild) -> None:
        real.start()
        await real.wait()

    @precondition(lambda self: self.real is not None)
    @rule(steps=st.integers(1, 8))
    def advance_real_rebuild(self, steps: int) -> None:
        real = self.real
        assert real is not None and real.task is not None
        for _ in range(steps):
            if real.task.done():
                break
            self.run(real.step())
        if real.task.done():
            self.real = None
            if self.run(_result(real.task)):
                SEEN["finished"] += 1
                self.run(self._check_copy())

    # -- reads -----------------------------------------------------------------------

    @rule(low=users_st, size=st.integers(1, 12))
    def read_many(self, low: int, size: int) -> None:
        """Users near the start of the id range are the first a rebuild reaches."""
        ids = [u for u in USERS if low <= u < low + size]
        now = self.clock()
        for svc, name in ((self.writer, "writer"), (self.reader, "reader")):
            answers = self.run(svc.users_segments(ids))
            for uid in ids:
                self._check(uid, answers[uid], now, f"users_segments via {name}")

    @invariant()
    def reads_equal_the_model(self) -> None:
        if not self.started:
            return
        now = self.clock()
        complete = self.run(self.cache.is_complete())
        before = (self.reader.reads_from_cache, self.reader.reads_from_store)
        one, many = self.run(self._read_all())
        for uid in USERS:
            self._check(uid, one[uid], now, "user_segments")
            self._check(uid, many[uid], now, "users_segments")
        if not complete:
            SEEN["redis_while_rebuilding"] += self.reader.reads_from_cache - before[0]
            SEEN["postgres_while_rebuilding"] += self.reader.reads_from_store - before[1]

    async def _read_all(self) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
        # Concurrent, as requests are: the reads answered from PostgreSQL go together.
        answers = await asyncio.gather(*(self.reader.user_segments(uid) for uid in USERS))
        many = await self.writer.users_segments(list(USERS))
        return dict(zip(USERS, answers, strict=True)), many

    # -- Redis equals PostgreSQL -------------------------------------------------------

    async def _check_copy(self) -> None:
        """After a rebuild completed: every user's key holds PostgreSQL's state (users
        whose last change is still held back excepted)."""
        now = self.clock()
        registry = await self.store.registry()
        users = [u for u in USERS if u not in self.unacked]
        versions = await self.cache.versions(users)
        for uid, cached_version in zip(users, versions, strict=True):
            state = await self.store.user_state(uid)
            if state.memberships or state.excluded:
                assert cached_version == state.version, (
                    f"user {uid}: Redis at version {cached_version}, PostgreSQL {state.version}"
                )
            else:
                # Nothing to show: no key at all, or one at PostgreSQL's version.
                assert cached_version in (None, state.version), (
                    f"user {uid}: Redis at version {cached_version}, PostgreSQL "
                    f"{state.version} with no memberships"
                )
            cached = await self.cache.read_user(uid, now)
            if cached is None:
                continue  # flushed or invalidated since (a later step)
            in_pg = {m.segment_id for m in state.memberships if m.expires_at > now + EDGE_S}
            near = {m.segment_id for m in state.memberships if abs(m.expires_at - now) <= EDGE_S}
            in_redis = {sid for sid in cached.member_ids if sid in registry.segments}
            assert in_redis - near == in_pg, f"user {uid}: Redis {in_redis}, PostgreSQL {in_pg}"

    def teardown(self) -> None:
        if not self.started:
            return
        self.run(self._teardown())

    async def _teardown(self) -> None:
        if self.real is not None:
            await self.real.stop()
        for r in self.rebuilds:
            await self.cache.release_rebuild(r.generation)
        # Every held write-through lands (the reconciler's outbox drain does it when
        # the process is gone), newest first: the older ones must not win.
        assert isinstance(self.slow, Deferred)
        for state in reversed(self.slow.held):
            await self.cache.write_users([state])
        self.unacked.clear()
        await self.cache.invalidate()
        assert await self._full_rebuild(), "no rebuild got the lease within 40 s"
        SEEN["finished"] += 1
        await self._check_copy()
        one, many = await self._read_all()
        for uid in USERS:
            self._check(uid, one[uid], self.clock(), "user_segments after the last rebuild")
            self._check(uid, many[uid], self.clock(), "users_segments after the last rebuild")


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro


async def _result(task: asyncio.Task[bool]) -> bool:
    return await task


def _bind(container: Container, loop: asyncio.AbstractEventLoop) -> type[RebuildMachine]:
    return type("BoundRebuildMachine", (RebuildMachine,), {"container": container, "loop": loop})


async def test_rebuild_machine(clean: Container) -> None:
    machine = _bind(clean, asyncio.get_running_loop())
    for key in SEEN:
        SEEN[key] = 0
    started = time.monotonic()
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)
    assert time.monotonic() - started < 120
    # The machine reached the states it is about: reads on both sides of a mark.
    assert SEEN["redis_while_rebuilding"] > 0, SEEN
    assert SEEN["postgres_while_rebuilding"] > 0, SEEN
    assert SEEN["finished"] > 0, SEEN


async def test_a_late_write_after_a_flush_does_not_outlive_the_next_rebuild(
    clean: Container,
) -> None:
    """The interleaving behind the rebuild writing users left with nothing (the
    machine's rules express it: a rebuild's batch, or a held write-through, read before
    a flush and landing after it, for a user who left every segment meanwhile)."""
    svc = SegmentService(clean.store, clean.cache, rebuild_batch=BATCH)
    svc._next_rebuild_at = math.inf
    await svc.create_segment("A")
    for uid in range(1, 10):
        await svc.update_user(uid, [AddRequest("A")], [])
    # A rebuild reads a batch holding user 2 in A ...
    generation = await clean.cache.begin_rebuild(LEASE_S)
    assert generation is not None
    batch = await anext(clean.store.user_states(BATCH))
    assert 2 in [s.user_id for s in batch]
    # ... user 2 then leaves A (acknowledged) ...
    assert await svc.update_user(2, [], ["A"]) == []
    assert await clean.cache.renew_rebuild(generation, LEASE_S)
    # ... Redis is flushed, and the batch read before lands after the flush.
    await clean.cache._r.flushall()
    await clean.cache.write_users(batch)
    # The next rebuild must replace that key: user 2 has no segments.
    assert await svc.rebuild_cache()
    assert await svc.user_segments(2) == []
    assert svc.reads_from_cache == 1


def _held_write_lands_after_a_flush(machine: RebuildMachine) -> None:
    machine.reset([["A"]] * len(USERS))
    machine.write(1, ["B"], [], None, leave_all=False, held=True)
    machine.write(1, [], [], None, leave_all=True, held=False)
    machine.flushall(land=True)
    machine.begin(steps=3)
    machine.reads_equal_the_model()
    machine.teardown()


async def test_machine_replays_a_held_write_landing_after_a_flush(clean: Container) -> None:
    """The other path to the same stale key, in the machine's own rules: a
    write-through held back (not acknowledged), the user's next change leaves every
    segment (acknowledged), Redis is flushed and the held write lands after it; the
    rebuild then reaches the user."""
    machine = _bind(clean, asyncio.get_running_loop())()
    await asyncio.to_thread(_held_write_lands_after_a_flush, machine)
