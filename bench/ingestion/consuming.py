"""The subject: ``segments consume`` timed from its start until PostgreSQL shows the
audience with every customer, with a timeline of its statements."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.ingestion.producing import MERCHANT_ID, SEGMENT_TYPE
from bench.measure import cpu_delta, cpu_seconds
from devstack import EmbeddedPostgres

ROUND_TIMEOUT_S = 240.0


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
