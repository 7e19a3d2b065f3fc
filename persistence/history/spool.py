"""What a report sets aside while it runs (the classes' members, PostgreSQL's rows at
the rules' instants), and the COPY helpers that read into it."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import IO, Any

from persistence.history.queries import Conn

# What a report sets aside (the classes' members, PostgreSQL's rows at the rules'
# instants) stays in memory up to this size, then goes to a temporary file.
SPOOL_MEMORY = 16 * 1024 * 1024

# What is read back from the spool at once.
SPOOL_PIECE = 1024 * 1024


class Spool:
    """Bytes set aside during a report: in memory up to SPOOL_MEMORY, then in a
    temporary file (deleted when closed)."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        self._size = 0

    def put(self, data: bytes) -> tuple[int, int]:
        self._file.seek(self._size)
        self._file.write(data)
        where = (self._size, len(data))
        self._size += len(data)
        return where

    def get(self, where: tuple[int, int]) -> bytes:
        self._file.seek(where[0])
        return self._file.read(where[1])

    def close(self) -> None:
        self._file.close()


@contextlib.asynccontextmanager
async def spooled() -> AsyncIterator[Spool]:
    spool = Spool()
    try:
        yield spool
    finally:
        spool.close()


async def copy_to(
    spool: Spool, conn: Conn, query: str, args: Sequence[Any], timeout_s: float | None
) -> tuple[int, int]:
    """A CSV COPY's bytes into the spool: where they are."""
    first = -1
    size = 0

    async def keep(chunk: bytes) -> None:
        nonlocal first, size
        offset, length = spool.put(chunk)
        first = offset if first < 0 else first
        size += length

    await conn.copy_from_query(
        query, *args, output=keep, format="csv", delimiter=";", timeout=timeout_s
    )
    return max(first, 0), size


async def copy_out(
    conn: Conn, query: str, args: Sequence[Any], timeout_s: float | None, **options: Any
) -> bytes:
    chunks: list[bytes] = []

    async def keep(chunk: bytes) -> None:
        chunks.append(chunk)

    await conn.copy_from_query(query, *args, output=keep, timeout=timeout_s, **options)
    return b"".join(chunks)


def csv_lines(data: bytes) -> Iterator[bytes]:
    """CSV lines (each with its newline): a quoted cell may hold a newline."""
    start = 0
    while start < len(data):
        end = data.index(b"\n", start) + 1
        while data.count(b'"', start, end) % 2:
            end = data.index(b"\n", end) + 1
        yield data[start:end]
        start = end
