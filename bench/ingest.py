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
import os
import random
import uuid

from bench.ingestion.ceilings import copy_ceiling, prepare, redis_ceiling
from bench.ingestion.consuming import ingest, verify
from bench.ingestion.producing import produce
from bench.ingestion.summary import Round, print_summary
from bench.stack import bench_stack


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
        rounds: list[Round] = []
        produced: list[tuple[float, int]] = []
        checked: dict[str, int] = {}
        failure: str | None = None
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
    print_summary(a, rounds, produced, checked, failure)


if __name__ == "__main__":
    main()
