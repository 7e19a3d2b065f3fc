"""A hypothesis state machine over history (issue 14): replaying a user's report gives
exactly what reads returned, at every step.

Explicit adds (with and without an expiry), removes, percentage rules created, raised,
lowered and dropped, segment deletion and re-creation, clock steps (real time: short
expiries and sleeps; PostgreSQL stamps history with its own clock, so an injected
service clock would not move it) and expiry sweeps interleave, for a handful of users,
two of them never written.  After every step every user is read (and checked against a
small model, so the final check cannot pass vacuously); at the end, for every user:

* the per-user report's rows alternate add/remove per segment, and replaying them
  gives, at each read's time, exactly the segments that read returned;
* the month-wide report has the same rows for each user written, none for the others;
* the explanation names the segments the last read returned, each ``since`` its last
  row;
* every report link is opened without a token; an expired link answers 410, an
  altered one 403.

Runs like tests/faults/test_state_machine.py: the machine in a worker thread, each
rule's coroutine on the session loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, TypeVar

import aiohttp
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from service.bootstrap import Container, api_app
from service.domain.errors import SegmentExists, SegmentNotFound
from service.domain.reports import sign_link
from service.domain.rules import bucket
from service.domain.service import AddRequest
from tests.conftest import TABLES, ApiTestServer
from tests.faults.test_state_machine import _quiesce, _wrap

T = TypeVar("T")

WRITTEN = (1, 2, 3, 4)
USERS = (*WRITTEN, 5, 10**12)  # the last two are only ever read
SLUGS = ("P", "R", "D")  # P plain; R and D take rules; D is deleted and re-created
RULED = ("R", "D")
PERCENTS = (None, 0, 25, 50, 75, 100)
# A read must see an expiring membership until (start of its write + ttl - margin) and
# not after (end of its write + ttl + margin); in between either answer is right.
MARGIN_S = 0.05
TOKEN = "h" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SETTINGS = settings(
    max_examples=20,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Read(msgspec.Struct, frozen=True):
    before: float
    after: float
    segments: dict[int, list[str]]


class HistoryMachine(RuleBasedStateMachine):
    container: ClassVar[Container]
    loop: ClassVar[asyncio.AbstractEventLoop]
    http: ClassVar[aiohttp.ClientSession]  # the API with auth on
    browser: ClassVar[aiohttp.ClientSession]  # no token, no base URL

    def __init__(self) -> None:
        super().__init__()
        self.c = self.container
        self.ready = False
        # The model: live segments (slug -> (id, auto_bp)), explicit memberships
        # (user -> slug -> expiry window, None: never), exclusions.
        self.live: dict[str, tuple[int, int | None]] = {}
        self.members: dict[int, dict[str, tuple[float, float] | None]] = {u: {} for u in USERS}
        self.excluded: dict[int, set[str]] = {u: set() for u in USERS}
        self.reads: list[Read] = []
        # Users the service has stored anything for (a row in user_versions).
        self.known: set[int] = set()
        # When the last expiry written has passed: the checks at the end wait for it, so
        # reports, reads and explanations made a moment apart see the same state.
        self.settle_at = 0.0

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_wrap(coro), self.loop).result(timeout=90)

    # -- set-up ---------------------------------------------------------------------------

    @initialize()
    def reset(self) -> None:
        self.run(self._reset())
        self.ready = True

    async def _reset(self) -> None:
        await _quiesce(self.c)
        async with self.c.store.connection() as conn:
            await conn.execute(f"TRUNCATE {TABLES} CASCADE")
        await self.c.cache._r.flushall()
        deadline = time.monotonic() + 30
        while not await self.c.segments.rebuild_cache():
            assert time.monotonic() < deadline, "the reset's rebuild never got the lease"
            await asyncio.sleep(0.05)
        for slug, percent in (("P", None), ("R", 50), ("D", None)):
            await self._create(slug, percent)

    async def _create(self, slug: str, percent: int | None) -> None:
        segment = await self.c.segments.create_segment(slug, "", percent)
        self.live[slug] = (segment.id, segment.auto_bp)

    # -- steps ----------------------------------------------------------------------------

    @rule(
        uid=st.sampled_from(WRITTEN),
        slug=st.sampled_from(SLUGS),
        ttl=st.sampled_from([None, None, 0.3, 0.7]),
    )
    def add(self, uid: int, slug: str, ttl: float | None) -> None:
        before = time.time()
        request = [AddRequest(slug, expires_at=None if ttl is None else before + ttl)]
        if slug not in self.live:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.update_user(uid, request, []))
            return
        self.run(self.c.segments.update_user(uid, request, []))
        after = time.time()
        self.known.add(uid)
        self.members[uid][slug] = None if ttl is None else (before + ttl, after + ttl)
        if ttl is not None:
            self.settle_at = max(self.settle_at, after + ttl)
        self.excluded[uid].discard(slug)

    @rule(uid=st.sampled_from(WRITTEN), slug=st.sampled_from(SLUGS))
    def remove(self, uid: int, slug: str) -> None:
        if slug not in self.live:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.update_user(uid, [], [slug]))
            return
        self.run(self.c.segments.update_user(uid, [], [slug]))
        self.known.add(uid)
        self.members[uid].pop(slug, None)
        if self.live[slug][1] is not None:
            self.excluded[uid].add(slug)

    @rule(slug=st.sampled_from(RULED), percent=st.sampled_from(PERCENTS))
    def set_rule(self, slug: str, percent: int | None) -> None:
        if slug not in self.live:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.update_segment(slug, auto_percent=percent, set_auto=True))
            return
        segment = self.run(
            self.c.segments.update_segment(slug, auto_percent=percent, set_auto=True)
        )
        self.live[slug] = (segment.id, segment.auto_bp)

    @rule()
    def delete(self) -> None:
        if "D" not in self.live:
            with pytest.raises(SegmentNotFound):
                self.run(self.c.segments.delete_segment("D"))
            return
        self.run(self.c.segments.delete_segment("D"))
        del self.live["D"]
        for uid in USERS:
            self.members[uid].pop("D", None)
            self.excluded[uid].discard("D")

    @rule(percent=st.sampled_from(PERCENTS))
    def recreate(self, percent: int | None) -> None:
        if "D" in self.live:
            with pytest.raises(SegmentExists):
                self.run(self.c.segments.create_segment("D", "", percent))
            return
        self.run(self._create("D", percent))

    @rule(seconds=st.sampled_from([0.1, 0.4, 0.8]))
    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    @rule()
    def sweep(self) -> None:
        self.run(self.c.segments.sweep_expired())

    # -- reads ----------------------------------------------------------------------------

    @invariant()
    def reads_equal_the_model(self) -> None:
        if not self.ready:
            return
        before = time.time()
        seen = self.run(self._read_all())
        after = time.time()
        self.reads.append(Read(before, after, seen))
        for uid, slugs in seen.items():
            certain, maybe = self._model(uid, before, after)
            assert set(slugs) - maybe == certain, f"user {uid}: read {slugs}, model {certain}"

    async def _read_all(self) -> dict[int, list[str]]:
        return {uid: await self.c.segments.user_segments(uid) for uid in USERS}

    def _model(self, uid: int, before: float, after: float) -> tuple[set[str], set[str]]:
        certain: set[str] = set()
        maybe: set[str] = set()
        for slug, (sid, bp) in self.live.items():
            window = self.members[uid].get(slug, "absent")
            by_rule = bp is not None and bucket(sid, uid) < bp and slug not in self.excluded[uid]
            if by_rule or window is None:
                certain.add(slug)
            elif isinstance(window, tuple):
                early, late = window
                if after < early - MARGIN_S:
                    certain.add(slug)
                elif before <= late + MARGIN_S:
                    maybe.add(slug)
        return certain, maybe

    # -- history, at the end ------------------------------------------------------------

    def teardown(self) -> None:
        if self.ready:
            self.run(self._check_history())
            self.run(_quiesce(self.c))

    async def _check_history(self) -> None:
        await asyncio.sleep(max(0.0, self.settle_at + 0.3 - time.time()))
        months = sorted(
            {dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m") for r in self.reads
             for t in (r.before, r.after)}
        )  # fmt: skip
        month_wide: list[list[str]] = []
        for period in months:
            month_wide += await self._report(period, None)
        for uid in USERS:
            rows: list[list[str]] = []
            for period in months:
                rows += await self._report(period, uid)
            self._check_replay(uid, rows)
            assert [r for r in month_wide if int(r[0]) == uid] == (
                rows if uid in self.known else []
            ), f"user {uid}: the month-wide report differs from the user's"
            await self._check_explain(uid, rows)
        await self._check_bad_links(months[-1])

    async def _report(self, period: str, uid: int | None) -> list[list[str]]:
        body: dict[str, object] = {"period": period}
        if uid is not None:
            body["user_id"] = uid
        async with self.http.post("/v1/reports/history", json=body, headers=AUTH) as r:
            assert r.status == 201, await r.text()
            url = (await r.json())["url"]
        async with self.browser.get(url) as r:  # the link alone, no token
            assert r.status == 200, await r.text()
            lines = (await r.text()).splitlines()
        assert lines[0] == "user_id;segment;operation;timestamp"
        return [line.split(";") for line in lines[1:]]

    def _check_replay(self, uid: int, rows: list[list[str]]) -> None:
        events: list[tuple[float, str, bool]] = []
        last: dict[str, bool] = {}
        for user, slug, op, at in rows:
            assert int(user) == uid
            assert last.get(slug) != (op == "add"), f"user {uid}: {slug} twice {op}: {rows}"
            last[slug] = op == "add"
            events.append((dt.datetime.fromisoformat(at).timestamp(), slug, op == "add"))
        stamps = [t for t, _, _ in events]
        assert stamps == sorted(stamps), f"user {uid}: a per-user report is ordered by time"

        def state(t: float) -> dict[str, bool]:
            out: dict[str, bool] = {}
            for at, slug, add in events:
                if at <= t:
                    out[slug] = add
            return out

        for read in self.reads:
            early, late = state(read.before), state(read.after)
            for slug in SLUGS:
                a, b = early.get(slug, False), late.get(slug, False)
                seen = slug in read.segments[uid]
                # A row inside the read's own window (an expiry) may go either way.
                assert seen in (a, b), (
                    f"user {uid} at {read.before:.6f}..{read.after:.6f}: read"
                    f" {read.segments[uid]}, the report replays {slug} as {a}/{b}"
                )

    async def _check_explain(self, uid: int, rows: list[list[str]]) -> None:
        final = await self.c.segments.user_segments(uid)
        async with self.http.get(f"/v1/users/{uid}/segments:explain", headers=AUTH) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        included = [s["slug"] for s in body["segments"] if s["included"]]
        assert included == final, f"user {uid}: explained {included}, read {final}"
        for entry in body["segments"]:
            mine = [row for row in rows if row[1] == entry["slug"]]
            if "since" in entry:
                assert mine, f"user {uid}: {entry} has a since without history rows"
                since = dt.datetime.fromisoformat(entry["since"])
                assert since == dt.datetime.fromisoformat(mine[-1][3]), (entry, mine)
            elif entry["included"]:
                pytest.fail(f"user {uid}: {entry} is included without a since")

    async def _check_bad_links(self, period: str) -> None:
        secret: bytes = self.c.reports._secret  # type: ignore[attr-defined]
        expired = sign_link(secret, period, WRITTEN[0], time.time() - 1)
        url = str(self.http._base_url) + "/v1/reports/history/"  # type: ignore[attr-defined]
        async with self.browser.get(url + expired) as r:
            assert r.status == 410, await r.text()
        valid = sign_link(secret, period, WRITTEN[0], time.time() + 60)
        altered = valid[:10] + ("x" if valid[10] != "x" else "y") + valid[11:]
        async with self.browser.get(url + altered) as r:
            assert r.status == 403, await r.text()


def _bind(
    container: Container,
    loop: asyncio.AbstractEventLoop,
    http: aiohttp.ClientSession,
    browser: aiohttp.ClientSession,
) -> type[HistoryMachine]:
    attrs: dict[str, Any] = {"container": container, "loop": loop, "http": http}
    attrs["browser"] = browser
    return type("BoundHistoryMachine", (HistoryMachine,), attrs)


@pytest.fixture
async def secured(clean: Container) -> AsyncIterator[aiohttp.ClientSession]:
    tokens = {"analyst": {"token": TOKEN, "scopes": ["read", "write", "reports"]}}
    settings_ = msgspec.structs.replace(clean.settings, auth_tokens=orjson.dumps(tokens).decode())
    server = ApiTestServer(api_app(clean, settings_), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session
    await server.close()


async def test_history_machine(clean: Container, secured: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with aiohttp.ClientSession() as browser:
        machine = _bind(clean, asyncio.get_running_loop(), secured, browser)
        await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)
    assert time.monotonic() - started < 90
