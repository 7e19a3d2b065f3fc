"""What the ingestion run prints: medians over rounds, each round's timeline, the ratios
to the ceilings and the verdict on the target."""

from __future__ import annotations

import argparse
import os

from bench.ingestion.consuming import STATEMENTS, Ingest
from bench.measure import median

TARGET = 150_000
# Each round: COPY seconds, PostgreSQL CPU seconds of the COPY, ZADD seconds, ingestion
# seconds, and the ingestion's figures.
Round = tuple[float, float, float, float, Ingest]


def print_summary(
    a: argparse.Namespace,
    rounds: list[Round],
    produced: list[tuple[float, int]],
    checked: dict[str, int],
    failure: str | None,
) -> None:
    n = a.customers
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
