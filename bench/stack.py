"""A throw-away embedded stack for benchmarks (temp dir, free ports)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncpg

from devstack import EmbeddedStack
from persistence.migrate import upgrade


@contextlib.contextmanager
def bench_stack() -> Iterator[EmbeddedStack]:
    with tempfile.TemporaryDirectory(prefix="segments-bench-") as tmp:
        stack = EmbeddedStack(Path(tmp), fast=True)
        stack.start()
        try:
            upgrade(stack.postgres.url)
            yield stack
        finally:
            stack.stop()


@contextlib.contextmanager
def server(
    args: list[str], env: dict[str, str], port: int, log: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess of this interpreter, up once it answers HTTP at all (any
    status); stderr to ``log``.  Terminated on exit."""
    err = subprocess.DEVNULL if log is None else open(log, "wb")  # noqa: SIM115
    # Our own interpreter and modules with fixed arguments, no shell.
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=err)  # nosec B603
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)  # nosec B310
                break
            except urllib.error.HTTPError:
                break  # 404 for "/": the server answers
            except OSError:
                assert proc.poll() is None, "server exited"
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)
        if log is not None:
            err.close()  # type: ignore[union-attr]


async def execute(dsn: str, statement: str) -> None:
    """One statement on a connection of its own (a benchmark's scratch table)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def copy_users(
    conn: asyncpg.Connection, segment_ids: Sequence[int], users: int, per_user: int
) -> None:
    """Users 1..``users``, each a member of ``per_user`` of ``segment_ids`` (spread
    evenly), with a version: the benchmarks' seeded population, by COPY."""
    n = len(segment_ids)
    await conn.copy_records_to_table(
        "memberships",
        records=(
            (u, segment_ids[(u + k * 4) % n]) for u in range(1, users + 1) for k in range(per_user)
        ),
        columns=["user_id", "segment_id"],
    )
    await conn.copy_records_to_table(
        "user_versions",
        records=((u, u) for u in range(1, users + 1)),
        columns=["user_id", "version"],
    )
