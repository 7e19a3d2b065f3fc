"""A bounded read/write load on loopback with an independent record of what clients
were told, used by the fault scenarios."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp

SLUGS = ["F1", "F2", "F3", "F4"]


@dataclass
class Record:
    """What each user's segments are, per the acknowledged writes only."""

    segments: dict[int, list[str]] = field(default_factory=dict)
    # Users whose last write ended without a clear answer (the outcome is unknown).
    unknown: set[int] = field(default_factory=set)
    writes: dict[int, int] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)


@dataclass
class Stats:
    reads: int = 0
    wrong: list[tuple[int, list[str], list[str]]] = field(default_factory=list)
    read_errors: int = 0
    max_read_s: float = 0.0
    acked: int = 0
    rejected: int = 0
    write_statuses: dict[int, int] = field(default_factory=dict)

    def summary(self, scenario: str) -> str:
        return (
            f"[{scenario}] reads={self.reads} wrong={len(self.wrong)}"
            f" read_errors={self.read_errors} max_read_ms={self.max_read_s * 1000:.0f}"
            f" writes={dict(sorted(self.write_statuses.items()))}"
        )


async def _writer(
    http: aiohttp.ClientSession, users: list[int], rec: Record, stats: Stats, stop: asyncio.Event
) -> None:
    rnd = random.Random(users[0])
    while not stop.is_set():
        uid = rnd.choice(users)
        slug = rnd.choice(SLUGS)
        current = rec.segments.get(uid, [])
        body = {"remove": [slug]} if slug in current else {"add": [slug]}
        rec.busy.add(uid)
        try:
            async with http.post(f"/v1/users/{uid}/segments", json=body) as r:
                stats.write_statuses[r.status] = stats.write_statuses.get(r.status, 0) + 1
                if r.status == 200:
                    rec.segments[uid] = (await r.json())["segments"]
                    rec.unknown.discard(uid)
                    stats.acked += 1
                elif r.status == 503:
                    stats.rejected += 1  # "nothing changed": the record stays as it is
                else:
                    rec.unknown.add(uid)
        except (aiohttp.ClientError, TimeoutError):
            rec.unknown.add(uid)
        finally:
            rec.writes[uid] = rec.writes.get(uid, 0) + 1
            rec.busy.discard(uid)
        await asyncio.sleep(0.005)


async def _reader(
    http: aiohttp.ClientSession, users: list[int], rec: Record, stats: Stats, stop: asyncio.Event
) -> None:
    rnd = random.Random(-users[0])
    while not stop.is_set():
        uid = rnd.choice(users)
        if uid in rec.busy or uid in rec.unknown:
            await asyncio.sleep(0)
            continue
        expected, seen = list(rec.segments.get(uid, [])), rec.writes.get(uid, 0)
        started = time.monotonic()
        try:
            async with http.get(f"/v1/users/{uid}/segments") as r:
                body = await r.json()
                ok = r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        stats.max_read_s = max(stats.max_read_s, time.monotonic() - started)
        if not ok:
            stats.read_errors += 1
            continue
        stats.reads += 1
        # Compare only if no write of this user started or ended meanwhile.
        settled = rec.writes.get(uid, 0) == seen and uid not in rec.busy | rec.unknown
        if settled and body["segments"] != expected:
            stats.wrong.append((uid, body["segments"], expected))


async def run_load(
    http: aiohttp.ClientSession,
    *,
    users: int,
    seconds: float,
    fault_at: float,
    fault,  # type: ignore[no-untyped-def]
    writers: int = 4,
    readers: int = 8,
    rec: Record | None = None,
) -> tuple[Record, Stats]:
    """Run writers and readers for ``seconds``; call ``fault()`` at ``fault_at``."""
    rec = rec or Record()
    stats = Stats()
    stop = asyncio.Event()
    ids = list(range(1, users + 1))
    owned = [ids[i::writers] for i in range(writers)]
    tasks = [asyncio.create_task(_writer(http, o, rec, stats, stop)) for o in owned]
    tasks += [asyncio.create_task(_reader(http, ids, rec, stats, stop)) for _ in range(readers)]
    await asyncio.sleep(fault_at)
    await fault()
    await asyncio.sleep(max(0.0, seconds - fault_at))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return rec, stats
