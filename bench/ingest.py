"""Kafka ingestion benchmark, end to end, against ceilings measured in the same run.

    .venv/bin/python -m bench.ingest [--customers 2000000] [--parts 20] [--rounds 3]

A ``replace`` snapshot of ``--customers`` random customer ids, split into ``--parts``
messages, is published with the project's own encoder to a fresh topic; then
``segments consume`` is started and timed from its start until PostgreSQL shows the
audience with every customer (``audiences.customers``, at the expected version).  The
service writes audiences to PostgreSQL only (Redis holds the promo-sync counters, not
the audiences), so there is nothing to wait for in Redis.

Ceilings, each round, alternating with the subject:
  (a) COPY of the same rows (generation, customer_id), sorted like the service sorts
      them, into a scratch table with the primary key of ``audience_members``, through
      asyncpg ``copy_records_to_table``;
  (b) the same number of members into Redis with redis-py (sync client, hiredis)
      pipelines of 10,000 members: 10 ZADDs of 1,000 members, one sorted-set key per
      1,000 members.

Target: >= 150,000 memberships/s end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis
from aiokafka import AIOKafkaProducer

from bench.measure import cpu_delta, cpu_seconds, median
from bench.stack import bench_stack
from devstack import EmbeddedPostgres
from service.ingest.messages import snapshot

TARGET = 150_000
MERCHANT_ID = 42
SEGMENT_TYPE = "BENCH_LOYAL"
SCRATCH = "bench_copy_ceiling"
REDIS_BATCH = 10_000
REDIS_KEY_MEMBERS = 1_000
ROUND_TIMEOUT_S = 240.0


# -- producing --------------------------------------------------------------------------


async def produce(bootstrap: str, topic: str, ids: list[int], parts: int) -> tuple[float, int]:
    """Publish one snapshot; returns (seconds, largest message in bytes)."""
    messages = snapshot(MERCHANT_ID, SEGMENT_TYPE, ids, parts, uuid.uuid4().hex)
    largest = max(len(value) for _, value in messages)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=32 * 1024 * 1024
    )
    await producer.start()
    try:
        started = time.perf_counter()
        # send_and_wait raises if the broker refuses a message (e.g. too large).
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key)
        return time.perf_counter() - started, largest
    finally:
        await producer.stop()


# -- the subject: segments consume ------------------------------------------------------


@dataclass
class Ingest:
    total_s: float  # consumer start -> the audience shows every customer
    assigned_s: float | None  # consumer start -> partitions assigned (from its log)
    first_commit_s: float | None  # consumer start -> first offset commit seen in PostgreSQL
    consumer_cpu_s: float
    pg_cpu_s: float
    # Statements of the consumer seen running in pg_stat_activity (polled every 50 ms):
    # label -> seconds from consumer start to the statement's start.
    statements: dict[str, float]
    final_xact_s: float | None  # start of the transaction that copied the members


# Statements of the consumer worth timing, by a prefix of their text.
STATEMENTS = {
    "INSERT INTO snapshot_parts": "stage a part",
    "DELETE FROM snapshot_parts": "read back the parts",
    "COPY": "COPY the members",
    "DELETE FROM audience_members": "delete the old generation",
}


def _log_line(line: str) -> tuple[float, str] | None:
    """(epoch, message) of a `segments` log line: a JSON line with "ts" (UTC) and "msg",
    or text ("2026-01-01 12:00:00,123 INFO logger: message", local time)."""
    try:
        record = json.loads(line)
        stamp = dt.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        return stamp.timestamp(), str(record.get("msg", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line[24:]
    except ValueError:
        return None


def ingest(
    env: dict[str, str], pg: EmbeddedPostgres, topic: str, customers: int, version: int, log: Path
) -> Ingest:
    pg0 = cpu_seconds(pg.pids)
    started_wall = time.time()
    started = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "consume"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        total, first_commit, statements, final_xact = asyncio.run(
            wait_for_audience(pg.url, proc, started, topic, customers, version, log)
        )
        consumer_cpu = sum(cpu_seconds([proc.pid]).values())
        pg_cpu = cpu_delta(pg0, cpu_seconds(pg.pids))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assigned = None
    for line in log.read_text(errors="replace").splitlines():
        parsed = _log_line(line)
        if parsed is not None and parsed[1].startswith("assigned ") and parsed[0] >= started_wall:
            assigned = parsed[0] - started_wall
    return Ingest(
        total,
        assigned,
        first_commit,
        consumer_cpu,
        pg_cpu,
        {k: v - started_wall for k, v in statements.items()},
        None if final_xact is None else final_xact - started_wall,
    )


async def wait_for_audience(
    dsn: str,
    proc: subprocess.Popen[bytes],
    started: float,
    topic: str,
    customers: int,
    version: int,
    log: Path,
) -> tuple[float, float | None, dict[str, float], float | None]:
    """Seconds until the audience is complete and until the first offset commit; the
    epochs at which the consumer's statements of interest (first and last seen) and the
    transaction that copied the members started."""
    conn = await asyncpg.connect(dsn)
    first_commit = None
    statements: dict[str, float] = {}
    final_xact = None
    offsets = "SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets WHERE topic = $1"
    committed = await conn.fetchval(offsets, topic)
    try:
        while True:
            row = await conn.fetchrow(
                "SELECT customers, version FROM audiences"
                " WHERE merchant_id = $1 AND segment_type = $2",
                MERCHANT_ID,
                SEGMENT_TYPE,
            )
            now = time.perf_counter()
            if row is not None and row["version"] >= version and row["customers"] == customers:
                return now - started, first_commit, statements, final_xact
            for r in await conn.fetch(
                "SELECT query, extract(epoch FROM query_start)::float8 AS q,"
                " extract(epoch FROM xact_start)::float8 AS x FROM pg_stat_activity"
                " WHERE state = 'active' AND pid <> pg_backend_pid()"
                " AND datname = current_database()"
            ):
                for prefix, label in STATEMENTS.items():
                    if r["query"].lstrip().startswith(prefix):
                        statements.setdefault(f"{label} (first seen)", r["q"])
                        statements[f"{label} (last seen)"] = r["q"]
                        if prefix == "COPY":
                            final_xact = r["x"]
            if first_commit is None and await conn.fetchval(offsets, topic) != committed:
                first_commit = now - started
            if proc.poll() is not None:
                raise RuntimeError(f"the consumer exited with {proc.returncode}; see {log}")
            if now - started > ROUND_TIMEOUT_S:
                raise RuntimeError(f"no complete audience after {ROUND_TIMEOUT_S:.0f} s; see {log}")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def verify(dsn: str, customers: int) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        generation = await conn.fetchval(
            "SELECT generation FROM audiences WHERE merchant_id = $1 AND segment_type = $2",
            MERCHANT_ID,
            SEGMENT_TYPE,
        )
        return {
            "current": await conn.fetchval(
                "SELECT count(*) FROM audience_members WHERE generation = $1", generation
            ),
            "all": await conn.fetchval("SELECT count(*) FROM audience_members"),
            "staged": await conn.fetchval("SELECT count(*) FROM snapshot_parts"),
            "history": await conn.fetchval(
                "SELECT count(*) FROM audience_history WHERE merchant_id = $1", MERCHANT_ID
            ),
        }
    finally:
        await conn.close()


# -- the ceilings -----------------------------------------------------------------------


async def copy_ceiling(
    pg: EmbeddedPostgres, ids: list[int], generation: int
) -> tuple[float, float]:
    """(seconds, PostgreSQL CPU seconds) for one COPY of every id."""
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(f"TRUNCATE {SCRATCH}")
        ordered = sorted(ids)
        pg0 = cpu_seconds(pg.pids)
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(
                SCRATCH,
                records=((generation, cid) for cid in ordered),
                columns=["generation", "customer_id"],
            )
        elapsed = time.perf_counter() - started
        return elapsed, cpu_delta(pg0, cpu_seconds(pg.pids))
    finally:
        await conn.close()


def redis_ceiling(url: str, ids: list[int], score: int) -> float:
    r = redis.Redis.from_url(url)
    try:
        keys = [f"bench:aud:{i}" for i in range(-(-len(ids) // REDIS_KEY_MEMBERS))]
        for i in range(0, len(keys), 1000):
            r.unlink(*keys[i : i + 1000])
        started = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for start in range(0, len(ids), REDIS_BATCH):
            for k in range(start, min(start + REDIS_BATCH, len(ids)), REDIS_KEY_MEMBERS):
                pipe.zadd(
                    keys[k // REDIS_KEY_MEMBERS],
                    dict.fromkeys(ids[k : k + REDIS_KEY_MEMBERS], score),
                )
            pipe.execute()
        elapsed = time.perf_counter() - started
        assert r.zcard(keys[-1]) > 0
        return elapsed
    finally:
        r.close()


async def prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"CREATE TABLE {SCRATCH} (generation bigint NOT NULL, customer_id bigint NOT NULL,"
            " PRIMARY KEY (generation, customer_id))"
        )
    finally:
        await conn.close()


# -- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=2_000_000)
    parser.add_argument("--parts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--db-command-timeout",
        type=float,
        default=None,
        help="SEGMENTS_DB_COMMAND_TIMEOUT_S for the consumer (default: the service's)",
    )
    a = parser.parse_args()
    n = a.customers
    rng = random.Random(7)
    with bench_stack() as stack:
        topic = f"bench-ingest-{uuid.uuid4().hex[:12]}"
        env = {
            **os.environ,
            **stack.env(),
            "SEGMENTS_LOG_LEVEL": "INFO",
            "SEGMENTS_KAFKA_TOPIC": topic,
            "SEGMENTS_KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        }
        if a.db_command_timeout is not None:
            env["SEGMENTS_DB_COMMAND_TIMEOUT_S"] = str(a.db_command_timeout)
        log = stack.root / "consumer.log"
        asyncio.run(prepare(stack.postgres.url))
        rounds: list[tuple[float, float, float, float, Ingest]] = []
        produced: list[tuple[float, int]] = []
        checked: dict[str, int] = {}
        failure = None
        for i in range(a.rounds):
            ids = rng.sample(range(1, 50 * n + 1), n)
            copy_s, copy_pg_cpu = asyncio.run(copy_ceiling(stack.postgres, ids, i + 1))
            redis_s = redis_ceiling(stack.valkey.url, ids, i + 1)
            produced.append(asyncio.run(produce(stack.broker.url, topic, ids, a.parts)))
            # A fresh group per round: with the previous round's group, the broker holds
            # the new member back until it gives up on the old one (~18 s on Tansu), a
            # restart cost, not ingestion.  Positions come from PostgreSQL either way.
            env["SEGMENTS_KAFKA_GROUP"] = f"{topic}-group-{i}"
            try:
                got = ingest(env, stack.postgres, topic, n, i + 1, log)
            except RuntimeError as exc:
                failure = str(exc)
                tail = log.read_text(errors="replace").splitlines()[-25:]
                failure += "\n" + "\n".join(f"      {line[:240]}" for line in tail)
                break
            rounds.append((copy_s, copy_pg_cpu, redis_s, got.total_s, got))
            print(
                f"  round {i + 1}: COPY {n / copy_s:,.0f}/s, ZADD {n / redis_s:,.0f}/s,"
                f" ingest {n / got.total_s:,.0f}/s ({got.total_s:.2f} s)",
                flush=True,
            )
            checked = asyncio.run(verify(stack.postgres.url, n))
    print(
        f"\ningestion, {n:,}-customer replace snapshot in {a.parts} parts"
        f" (largest message {max(s for _, s in produced) / 1e6:.2f} MB),"
        f" {len(rounds)} of {a.rounds} rounds; medians over rounds ({os.cpu_count()} CPUs)"
    )
    if a.db_command_timeout is not None:
        print(f"  consumer run with SEGMENTS_DB_COMMAND_TIMEOUT_S={a.db_command_timeout:g}")
    print(f"  producing (not timed in ingestion): {median([p for p, _ in produced]):.2f} s")
    if rounds:
        copy_rate = median([n / r[0] for r in rounds])
        redis_rate = median([n / r[2] for r in rounds])
        ingest_rate = median([n / r[3] for r in rounds])
        total = median([r[3] for r in rounds])
        assigned = [r[4].assigned_s for r in rounds if r[4].assigned_s is not None]
        print(
            f"  (a) ceiling: PostgreSQL COPY, asyncpg    {copy_rate:>10,.0f} memberships/s"
            f"  ({median([r[0] for r in rounds]):.2f} s, PostgreSQL CPU"
            f" {median([r[1] for r in rounds]):.2f} s)"
        )
        print(
            f"  (b) ceiling: Redis pipelined ZADD        {redis_rate:>10,.0f} memberships/s"
            f"  ({median([r[2] for r in rounds]):.2f} s)"
        )
        print(
            f"  ingestion, Kafka -> PostgreSQL, end to end {ingest_rate:>8,.0f} memberships/s"
            f"  ({total:.2f} s from consumer start)"
        )
        if assigned:
            apply_s = median([r[3] - r[4].assigned_s for r in rounds if r[4].assigned_s])
            print(
                f"    of which: consumer start -> partitions assigned {median(assigned):.2f} s;"
                f" assigned -> audience complete {apply_s:.2f} s"
                f" ({n / apply_s:,.0f} memberships/s)"
            )
        print("    timeline of each round, seconds from consumer start:")
        for k, r in enumerate(rounds):
            got = r[4]
            marks = [("assigned", got.assigned_s), ("first offset commit", got.first_commit_s)]
            marks.append(("last part's transaction", got.final_xact_s))
            for label in STATEMENTS.values():
                marks.append((label, got.statements.get(f"{label} (first seen)")))
            marks.append(("complete", got.total_s))
            seen = sorted((at, label) for label, at in marks if at is not None)
            print(f"      round {k + 1}: " + ", ".join(f"{at:.2f} {label}" for at, label in seen))
        final = [r[3] - r[4].final_xact_s for r in rounds if r[4].final_xact_s is not None]
        if final:
            print(
                "    from the start of the last part's transaction to complete:"
                f" {median(final):.2f} s"
                f" ({n / median(final):,.0f} memberships/s)"
            )
        print(
            "    CPU during ingestion: consumer"
            f" {median([r[4].consumer_cpu_s for r in rounds]):.2f} s,"
            f" PostgreSQL {median([r[4].pg_cpu_s for r in rounds]):.2f} s"
        )
        print(
            f"  ingestion / COPY ceiling  {median([r[0] / r[3] for r in rounds]):.2f}x;"
            f"  ingestion / ZADD ceiling  {median([r[2] / r[3] for r in rounds]):.2f}x"
            " (medians of per-round ratios)"
        )
        verdict = "holds" if ingest_rate >= TARGET else "does NOT hold"
        print(f"  target >= {TARGET:,} memberships/s end to end: {verdict}")
        print(
            f"  after the last round: {checked['current']:,} rows in the current generation,"
            f" {checked['all']:,} in audience_members, {checked['staged']} staged parts left,"
            f" {checked['history']} history rows"
        )
    if failure is not None:
        print(f"  FAILED in round {len(rounds) + 1}: {failure}")


if __name__ == "__main__":
    main()
