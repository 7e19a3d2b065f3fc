"""A hot user written at once through two `segments serve` processes: every
acknowledged change applied exactly once, and the answers agree with PostgreSQL."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg

from service.bootstrap import Container
from service.settings import Settings
from tests.checks import replayed_history
from tests.conftest import scrape, serve_process

SLUGS = ["A", "B", "C", "D"]
WRITES = 120
UID = 4242


async def test_a_hot_user_written_through_two_processes_applies_every_change_once(
    settings: Settings, clean: Container, db: asyncpg.Connection
) -> None:
    for slug in SLUGS:
        await clean.store.create_segment(slug, "", None)
    with (
        serve_process(settings) as (_, port1),
        serve_process(settings) as (_, port2),
    ):
        async with aiohttp.ClientSession() as s:

            async def write(i: int) -> tuple[int, list[str]]:
                port = port1 if i % 2 else port2
                body = {"add": [SLUGS[i % 4], SLUGS[(i + 1) % 4]], "remove": [SLUGS[(i + 2) % 4]]}
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/users/{UID}/segments", json=body
                ) as r:
                    assert r.status == 200, await r.text()
                    segments: list[str] = (await r.json())["segments"]
                    return i, segments

            answers = await asyncio.gather(*(write(i) for i in range(WRITES)))
            async with s.get(f"http://127.0.0.1:{port1}/v1/users/{UID}/segments") as r:
                read_back = (await r.json())["segments"]
        counted = {
            labels["kind"]: value
            for port in (port1, port2)
            for labels, value in scrape(f"http://127.0.0.1:{port}/metrics").get(
                "segments_user_write_conflicts_total", []
            )
        }
    # Every change was applied once: one outbox row with a new version each, the last
    # of them the user's version.
    versions = await db.fetch("SELECT change_id FROM cache_outbox WHERE user_id = $1", UID)
    assert len({r[0] for r in versions}) == WRITES
    assert await db.fetchval("SELECT version FROM user_versions WHERE user_id = $1", UID) == max(
        r[0] for r in versions
    )
    # Each answer is the state right after its own change.
    for i, answer in answers:
        assert {SLUGS[i % 4], SLUGS[(i + 1) % 4]} <= set(answer)
        assert SLUGS[(i + 2) % 4] not in answer
    assert await replayed_history(db, UID) == set(read_back)
    # The state read back is one of the answers; conflicts between the processes (if
    # any) were counted, and no change was refused.
    assert sorted(read_back) in [sorted(a) for _, a in answers]
    assert set(counted) <= {"conflict", "locked", "turn_timeout"}
    assert counted.get("turn_timeout", 0) == 0
