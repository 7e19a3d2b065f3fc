"""Write-path benchmark against a ceiling measured in the same run.

    .venv/bin/python -m bench.writes [--users 100000] [--seconds 8] [--rounds 3]

POST /v1/users/{id}/segments with {"add": ["A"], "remove": ["B"]} and the reverse,
alternating per user so that every request changes something, over random user ids,
one API worker, 64 connections (wrk).  The ceiling is a bare aiohttp handler (uvloop,
like the API) doing ONE single-row asyncpg INSERT into a scratch table from a pool of
the service's default size.  Rounds alternate ceiling/API; the ratio is the median of
the per-round ratios.  Target: >= 2,000 req/s for the API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import asyncpg
import orjson

from bench.measure import cpu_seconds, median
from bench.stack import bench_stack, execute, server
from bench.wrk import WrkResult, run_script
from devstack import EmbeddedPostgres, free_port
from service.settings import Settings

TARGET_RPS = 2_000
CONNECTIONS = 64
SCRATCH = "bench_write_ceiling"

# One wrk thread: the per-user toggle table is shared by all of its connections, so a
# user's requests alternate between the two bodies and each one changes something.  The
# state file holds one character per user, "1" for users in A, read from PostgreSQL
# before each run, so that the first request of a user in a run changes something too.
WRITE_SCRIPT = """
math.randomseed(%(seed)d)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {'{"add":["A"],"remove":["B"]}', '{"add":["B"],"remove":["A"]}'}
local file = io.open("%(state)s", "rb")
local state = file:read("*a")
file:close()
local flip = {}
request = function()
  local id = math.random(1, %(users)d)
  local f = flip[id] or (state:byte(id) - 48)
  flip[id] = 1 - f
  return wrk.format(nil, "/v1/users/" .. id .. "/segments", nil, bodies[f + 1])
end
"""


# -- the ceiling: a bare aiohttp handler with one asyncpg INSERT -------------------------


def ceiling_server(port: int, dsn: str, pool_size: int) -> None:
    import uvloop
    from aiohttp import web

    body = b'{"user_id":1,"segments":["A"]}'

    async def make_app() -> web.Application:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=pool_size)

        async def write(request: web.Request) -> web.Response:
            await request.read()
            await pool.execute(
                f"INSERT INTO {SCRATCH} (user_id, segment_id) VALUES ($1, $2)",
                int(request.match_info["user_id"]),
                1,
            )
            return web.Response(body=body, headers={"Content-Type": "application/json"})

        async def close(_: web.Application) -> None:
            await pool.close()

        app = web.Application()
        app.router.add_post("/v1/users/{user_id}/segments", write)
        app.on_cleanup.append(close)
        return app

    uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=port, access_log=None, print=None)


# -- running things ---------------------------------------------------------------------


async def in_a(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT m.user_id FROM memberships m JOIN segments s ON s.id = m.segment_id"
            " WHERE s.slug = 'A'"
        )
    finally:
        await conn.close()
    return [r[0] for r in rows]


def write_state(path: str, users: int, members_of_a: list[int]) -> None:
    state = bytearray(b"0" * users)
    for uid in members_of_a:
        state[uid - 1] = ord("1")
    with open(path, "wb") as f:
        f.write(state)


def run_wrk_writes(port: int, users: int, seconds: int, seed: int, state: str) -> WrkResult:
    script = WRITE_SCRIPT % {"seed": seed, "users": users, "state": state}
    url = f"http://127.0.0.1:{port}/v1/users/1/segments"
    return run_script(script, url, seconds=seconds, connections=CONNECTIONS)


@dataclass(frozen=True)
class Round:
    wrk: WrkResult
    seconds: int
    server_cpu_s: float  # the HTTP server process
    pg_cpu_s: float  # PostgreSQL, all processes

    def cpu_ms(self, seconds: float) -> float:
        return 1000 * seconds / (self.wrk.rps * self.seconds)


def measure(
    port: int,
    users: int,
    seconds: int,
    seed: int,
    dsn: str | None,
    server_pid: int,
    pg: EmbeddedPostgres,
) -> Round:
    """A 2 s warm-up, then the measured run; ``dsn`` set: the API (state from PostgreSQL)."""
    with tempfile.NamedTemporaryFile(suffix=".state", delete=False) as f:
        state = f.name
    try:
        write_state(state, users, asyncio.run(in_a(dsn)) if dsn else [])
        run_wrk_writes(port, users, 2, seed + 1000, state)  # warm-up
        if dsn is not None:
            time.sleep(0.3)  # requests wrk cut off may still be finishing
        write_state(state, users, asyncio.run(in_a(dsn)) if dsn else [])
        server0, pg0 = cpu_seconds([server_pid]), cpu_seconds(pg.pids)
        result = run_wrk_writes(port, users, seconds, seed, state)
        server1, pg1 = cpu_seconds([server_pid]), cpu_seconds(pg.pids)
        return Round(
            result,
            seconds,
            sum(server1.values()) - sum(server0.values()),
            sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()),
        )
    finally:
        os.unlink(state)


def post_json(port: int, path: str, body: object) -> object:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=orjson.dumps(body),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return orjson.loads(r.read())


def get_json(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return orjson.loads(r.read())


async def prepare(dsn: str) -> None:
    await execute(
        dsn,
        f"CREATE TABLE {SCRATCH} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " user_id bigint NOT NULL, segment_id bigint NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now())",
    )


async def check(dsn: str, redis_url: str, port: int) -> dict[str, object]:
    """After the run every touched user is in exactly one of A and B, in PostgreSQL and
    through the API (Redis); count the users where either does not hold."""
    conn = await asyncpg.connect(dsn)
    try:
        touched = await conn.fetchval("SELECT count(*) FROM user_versions")
        bad_pg = await conn.fetchval(
            "SELECT count(*) FROM (SELECT v.user_id FROM user_versions v"
            " LEFT JOIN memberships m USING (user_id) GROUP BY v.user_id"
            " HAVING count(m.segment_id) <> 1) x"
        )
        sample = await conn.fetch(
            "SELECT m.user_id, s.slug FROM memberships m JOIN segments s ON s.id = m.segment_id"
            " ORDER BY random() LIMIT 300"
        )
        outbox = await conn.fetchval("SELECT count(*) FROM cache_outbox")
    finally:
        await conn.close()
    import redis

    from cache import keys

    cache = redis.Redis.from_url(redis_url)
    mismatches = []
    for r in sample:
        uid = r["user_id"]
        got = get_json(port, f"/v1/users/{uid}/segments")
        if got["segments"] != [r["slug"]]:  # type: ignore[index]
            cached = cache.zrange(keys.user(uid), 0, -1, withscores=True)
            mismatches.append(f"user {uid}: PostgreSQL {r['slug']}, API {got}, Redis {cached}")
    cache.close()
    return {
        "touched": touched,
        "bad_pg": bad_pg,
        "sampled": len(sample),
        "mismatches": mismatches,
        "outbox": outbox,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ceiling-server", type=int, default=0, help=argparse.SUPPRESS)
    a = parser.parse_args()
    pool_size = Settings().db_pool_max  # the service default (20)
    if a.ceiling_server:
        ceiling_server(a.ceiling_server, os.environ["SEGMENTS_DATABASE_URL"], pool_size)
        return
    with bench_stack() as stack:
        env = {**os.environ, **stack.env(), "SEGMENTS_LOG_LEVEL": "WARNING"}
        asyncio.run(prepare(stack.postgres.url))
        port, bare_port = free_port(), free_port()
        rounds: list[tuple[Round, Round]] = []
        ceiling_cmd = ["-m", "bench.writes", "--ceiling-server", str(bare_port)]
        api_cmd = ["-m", "service.cli", "serve", "--port", str(port), "--workers", "1"]
        api_log = os.path.join(stack.root, "api.log")
        with (
            server(ceiling_cmd, env, bare_port) as bare_proc,
            server(api_cmd, env, port, api_log) as api_proc,
        ):
            for slug in ("A", "B"):
                post_json(port, "/v1/segments", {"slug": slug})
            for i in range(a.rounds):
                ceiling = measure(
                    bare_port, a.users, a.seconds, 11 + i, None, bare_proc.pid, stack.postgres
                )
                api = measure(
                    port,
                    a.users,
                    a.seconds,
                    23 + i,
                    stack.postgres.url,
                    api_proc.pid,
                    stack.postgres,
                )
                rounds.append((ceiling, api))
                print(
                    f"  round {i + 1}: ceiling {ceiling.wrk.rps:,.0f} req/s,"
                    f" API {api.wrk.rps:,.0f} req/s",
                    flush=True,
                )
            time.sleep(2)  # requests that wrk cut off finish (p99 is well under 1 s)
            checked = asyncio.run(check(stack.postgres.url, stack.valkey.url, port))
        with open(api_log, errors="replace") as f:
            warnings = [line.rstrip() for line in f if " WARNING " in line or " ERROR " in line]

    def figures(rs: list[Round]) -> str:
        rps = median([r.wrk.rps for r in rs])
        p99 = median([r.wrk.p99_ms for r in rs])
        server = median([r.cpu_ms(r.server_cpu_s) for r in rs])
        pg = median([r.cpu_ms(r.pg_cpu_s) for r in rs])
        return (
            f"{rps:>7,.0f} req/s  p99 {p99:7.2f} ms  CPU/request: server {server:.3f} ms,"
            f" PostgreSQL {pg:.3f} ms"
        )

    api_rps = median([s.wrk.rps for _, s in rounds])
    ratio = median([s.wrk.rps / c.wrk.rps for c, s in rounds])
    errors = sum(r.wrk.errors for pair in rounds for r in pair)
    print(
        f"\nwrite path, POST /v1/users/{{id}}/segments (add one, remove the other),"
        f" random ids in 1..{a.users:,},\n{CONNECTIONS} connections, wrk, {a.rounds}"
        f" alternating rounds of {a.seconds} s; figures are medians over rounds"
        f" ({os.cpu_count()} CPUs)"
    )
    print(
        f"  ceiling: bare aiohttp + one asyncpg single-row INSERT (pool {pool_size})\n"
        f"           {figures([c for c, _ in rounds])}"
    )
    print(f"  API, 1 worker\n           {figures([s for _, s in rounds])}")
    print(f"  API / ceiling (median of per-round ratios): {ratio:.2f}x")
    print(
        "  per round (ceiling / API req/s): "
        + ", ".join(f"{c.wrk.rps:,.0f} / {s.wrk.rps:,.0f}" for c, s in rounds)
    )
    verdict = "holds" if api_rps >= TARGET_RPS else "does NOT hold"
    print(f"  target >= {TARGET_RPS:,} req/s for the API: {verdict}")
    print(f"  non-2xx responses / timeouts: {errors}")
    mismatches: list[str] = checked["mismatches"]  # type: ignore[assignment]
    print(
        f"  consistency: {checked['touched']:,} users touched, {checked['bad_pg']} not in"
        f" exactly one of A/B in PostgreSQL; {len(mismatches)} of {checked['sampled']}"
        f" sampled API reads disagree with PostgreSQL; cache_outbox rows left"
        f" (no reconciler running): {checked['outbox']:,}"
    )
    for line in mismatches:
        print(f"    {line}")
    print(f"  API log: {len(warnings)} WARNING/ERROR lines")
    for line in warnings[:5]:
        print(f"    {line[:300]}")


if __name__ == "__main__":
    main()
