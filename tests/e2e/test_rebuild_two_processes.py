"""Reads and writes through two `segments serve` processes while a third process
(`segments rebuild`, paced) rebuilds the flushed Redis copy (docs/cache-format.md,
"Completeness"): users behind the progress mark are answered from Redis, the others
from PostgreSQL, and every answer is right either way.

Writers own disjoint users, so after each acknowledged write the read back through
either process must show exactly that write; readers of users nobody writes must get
their seeded segments; a burst of 200 concurrent reads goes to PostgreSQL at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg

from service.bootstrap import Container
from service.settings import Settings
from tests.conftest import scrape, serve_process

USERS = 6000
SLUGS = ["A", "B", "C", "D", "E", "F"]
PER_USER = 2
WRITERS = 12
READERS = 8
BURST = 200
# The rebuild takes about USERS / RATE seconds, in marks of 500 users (its paced
# batch), so the load overlaps a rebuild at every stage.
RATE = 1000
DEADLINE_S = 60


def _seeded(uid: int) -> list[str]:
    """What _seed gives user ``uid``."""
    return sorted({SLUGS[(uid + k * 4) % len(SLUGS)] for k in range(PER_USER)})


def _written(uid: int) -> bool:
    """Users the writers change (every fourth); the rest keep their seeded segments."""
    return uid % 4 == 0


async def _seed(db: asyncpg.Connection, ids: dict[str, int]) -> None:
    await db.copy_records_to_table(
        "memberships",
        records=[(u, ids[s]) for u in range(1, USERS + 1) for s in _seeded(u)],
        columns=["user_id", "segment_id"],
    )
    # Versions below the next change id, so the writes of the test are newer.
    base = await db.fetchval("SELECT nextval('change_id_seq')")
    await db.copy_records_to_table(
        "user_versions",
        records=[(u, base) for u in range(1, USERS + 1)],
        columns=["user_id", "version"],
    )


def _reads(ports: tuple[int, int]) -> dict[str, float]:
    """User reads of both API processes by where they were answered from."""
    out = {"redis": 0.0, "postgres": 0.0}
    for port in ports:
        for labels, value in scrape(f"http://127.0.0.1:{port}/metrics").get(
            "segments_user_reads_total", []
        ):
            out[labels["source"]] += value
    return out


async def test_reads_and_writes_through_two_processes_while_a_third_rebuilds(
    settings: Settings, clean: Container, db: asyncpg.Connection, tmp_path: Path
) -> None:
    ids = {slug: (await clean.segments.create_segment(slug)).id for slug in SLUGS}
    await _seed(db, ids)
    await clean.cache._r.flushall()  # Redis lost: the copy must be rebuilt
    api_env = {"SEGMENTS_REBUILD_DELAY_S": "3600"}  # the API processes leave it to others
    with (
        serve_process(settings, env=api_env) as (_, port1),
        serve_process(settings, env=api_env) as (_, port2),
    ):
        ports = (port1, port2)
        errors: list[str] = []
        counts = {"writes": 0, "reads": 0, "burst": 0}
        acked: dict[int, list[str]] = {}
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=20)
        ) as s:

            async def get(port: int, uid: int) -> list[str]:
                async with s.get(f"http://127.0.0.1:{port}/v1/users/{uid}/segments") as r:
                    assert r.status == 200, await r.text()
                    segments: list[str] = (await r.json())["segments"]
                    return segments

            async def batch(port: int, uids: list[int]) -> dict[int, list[str]]:
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/users/segments:batch", json={"user_ids": uids}
                ) as r:
                    assert r.status == 200, await r.text()
                    return {int(k): v for k, v in (await r.json())["users"].items()}

            # The rebuild, paced, in its own process.
            env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
            env |= {
                "SEGMENTS_DATABASE_URL": settings.database_url,
                "SEGMENTS_REDIS_URL": settings.redis_url,
                "SEGMENTS_REBUILD_MAX_USERS_PER_S": str(RATE),
                "SEGMENTS_LOG_JSON": "false",
            }
            before = _reads(ports)
            log = tmp_path / "rebuild.log"
            with log.open("wb") as err:
                # Our own interpreter and module, fixed arguments.
                rebuild = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "service.cli", "rebuild", env=env, stderr=err
                )
            started = time.monotonic()

            def running() -> bool:
                return rebuild.returncode is None and time.monotonic() - started < DEADLINE_S

            async def guarded(name: str, work: Callable[[], Awaitable[None]]) -> None:
                try:
                    while running():
                        await work()
                except Exception as exc:  # every failure is counted and shown
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")

            def writer(w: int) -> Callable[[], Awaitable[None]]:
                rng = random.Random(w)
                mine = [u for u in range(4, USERS + 1, 4) if (u // 4) % WRITERS == w]

                async def write_once() -> None:
                    uid = rng.choice(mine)
                    add = rng.sample(SLUGS, rng.randint(0, 2))
                    remove = rng.sample([x for x in SLUGS if x not in add], rng.randint(0, 3))
                    port = rng.choice(ports)
                    async with s.post(
                        f"http://127.0.0.1:{port}/v1/users/{uid}/segments",
                        json={"add": add, "remove": remove},
                    ) as r:
                        assert r.status == 200, await r.text()
                        answer: list[str] = (await r.json())["segments"]
                    acked[uid] = answer
                    counts["writes"] += 1
                    # The acknowledged write, through the same and the other process.
                    for p in (port, port1 if port == port2 else port2):
                        seen = await get(p, uid)
                        assert seen == answer, f"user {uid} via {p}: {seen}, acked {answer}"
                        counts["reads"] += 1

                return write_once

            def reader(k: int) -> Callable[[], Awaitable[None]]:
                rng = random.Random(1000 + k)

                async def read_once() -> None:
                    uids = [u for u in rng.sample(range(1, USERS + 1), 40) if not _written(u)]
                    port = rng.choice(ports)
                    if k % 2:
                        found = await batch(port, uids)
                    else:
                        found = {u: await get(port, u) for u in uids[:5]}
                    for uid, seen in found.items():
                        assert seen == _seeded(uid), f"user {uid} via {port}: {seen}"
                    counts["reads"] += len(found)

                return read_once

            async def bursts() -> None:
                """BURST concurrent reads of the users the rebuild reaches last (from
                PostgreSQL), then of users spread over the whole range."""
                for uids in (
                    [u for u in range(USERS, 0, -1) if not _written(u)][:BURST],
                    [u for u in range(1, USERS + 1, 7) if not _written(u)][:BURST],
                ):
                    if not running():
                        return
                    answers = await asyncio.gather(
                        *(get(ports[i % 2], u) for i, u in enumerate(uids))
                    )
                    for uid, seen in zip(uids, answers, strict=True):
                        assert seen == _seeded(uid), f"burst: user {uid}: {seen}"
                    counts["burst"] += len(uids)
                    await asyncio.sleep(1.5)

            async def watch() -> dict[str, float]:
                """The read counts last seen while the copy was still incomplete."""
                seen = before
                while running():
                    counted = await asyncio.to_thread(_reads, ports)
                    if not await clean.cache.is_complete():
                        seen = counted
                    await asyncio.sleep(0.3)
                return seen

            async def once(name: str, work: Callable[[], Awaitable[None]]) -> None:
                try:
                    await work()
                except Exception as exc:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")

            watching = asyncio.create_task(watch())
            await asyncio.gather(
                *(guarded(f"writer {w}", writer(w)) for w in range(WRITERS)),
                *(guarded(f"reader {k}", reader(k)) for k in range(READERS)),
                once("bursts", bursts),
            )
            during = await watching
            elapsed = time.monotonic() - started
            try:
                returncode = await asyncio.wait_for(rebuild.wait(), 10)
            finally:
                if rebuild.returncode is None:
                    rebuild.kill()
                    await rebuild.wait()
            text = log.read_text()
            assert returncode == 0, text[-3000:]
            assert elapsed < DEADLINE_S, f"the rebuild took over {DEADLINE_S} s"
            assert not errors, f"{len(errors)} errors, first: {errors[:5]}"
            assert await clean.cache.is_complete()

            # The load overlapped the rebuild: answers came from Redis (behind the mark)
            # and from PostgreSQL while the copy was incomplete.
            assert during["redis"] - before["redis"] > 0, (before, during)
            assert during["postgres"] - before["postgres"] > 0, (before, during)
            assert counts["writes"] >= 100 and counts["reads"] >= 2000, counts
            assert counts["burst"] >= BURST, counts

            # At the end every user reads as PostgreSQL holds it, through both processes.
            rows = await db.fetch(
                "SELECT m.user_id, array_agg(s.slug ORDER BY s.slug) FROM memberships m"
                " JOIN segments s ON s.id = m.segment_id AND s.deleted_at IS NULL"
                " WHERE m.expires_at IS NULL OR m.expires_at > now() GROUP BY m.user_id"
            )
            truth = {r[0]: list(r[1]) for r in rows}
            for port in ports:
                for low in range(1, USERS + 1, 1000):
                    found = await batch(port, list(range(low, min(low + 1000, USERS + 1))))
                    for uid, seen in found.items():
                        assert seen == truth.get(uid, []), f"user {uid} via {port}: {seen}"
                        if uid in acked:
                            assert seen == acked[uid], f"user {uid}: {seen}, acked {acked[uid]}"
                        elif not _written(uid):
                            assert seen == _seeded(uid)
