"""Step 2 of a report: PostgreSQL's CSV passed through, the classes' rows written in
place of each marker line, merged with PostgreSQL's rows at that instant."""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterator

from persistence.history.derive import Batch, Classes
from persistence.history.spool import SPOOL_PIECE, Spool, csv_lines


class Instants:
    """Writes the classes' rows at each instant, merged with PostgreSQL's rows there."""

    def __init__(
        self,
        sink: Callable[[bytes], Awaitable[None]],
        spool: Spool,
        batches: list[Batch],
        classes: Classes,
        theirs: tuple[int, int],
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._batches = batches
        self._classes = classes
        # (instant index, user, how many class rows there sort before it, line)
        self._theirs = self._parse(theirs)
        self._next = next(self._theirs, None)

    def _parse(self, where: tuple[int, int]) -> Iterator[tuple[int, int, int, bytes]]:
        """PostgreSQL's rows at the instants (spooled), read a piece at a time."""
        offset, left = where
        carry = b""
        while left or carry:
            piece = self._spool.get((offset, min(left, SPOOL_PIECE)))
            offset, left = offset + len(piece), left - len(piece)
            data = carry + piece
            cut = len(data)
            if left:  # whole lines only: a quoted cell may hold a newline
                cut = data.rfind(b"\n") + 1
                while data.count(b'"', 0, cut) % 2:
                    cut = data.rfind(b"\n", 0, cut - 1) + 1
            carry = data[cut:]
            for line in csv_lines(data[:cut]):
                i, before, rest = line.split(b";", 2)
                yield int(i) - 1, int(rest[: rest.index(b";")]), int(before), rest

    async def write(self, i: int) -> None:
        keys = self._classes.at[i]
        for n, found in enumerate(self._batches):
            ours = [(k, where) for k in keys for b, where in self._classes.spooled[k] if b == n]
            theirs = []
            while self._next is not None and self._next[0] == i and self._next[1] <= found.hi:
                theirs.append(self._next[1:])
                self._next = next(self._theirs, None)
            if len(ours) == 1:
                # The usual case: one segment's rule changed at this instant.
                await self._sink(self._one(*ours[0], theirs))
            elif ours or theirs:
                await self._merge(ours, theirs)
        while self._next is not None and self._next[0] == i:  # users past every batch
            await self._sink(self._next[3])
            self._next = next(self._theirs, None)

    def _one(self, k: int, where: tuple[int, int], theirs: list[tuple[int, int, bytes]]) -> bytes:
        """Key ``k``'s lines (a user id, then the key's cells), merged with ``theirs``."""
        cells = self._classes.cells[k]
        ids = self._spool.get(where)
        if not theirs:
            return ids.replace(b"\n", cells) + cells
        split = ids.split(b"\n")
        users = list(map(int, split))
        rank = self._classes.rank[k]
        parts: list[bytes] = []
        done = 0
        for user, before, line in theirs:
            # This key's row for `user`, if any, comes first when its slug sorts first.
            if rank <= before:
                cut = bisect_right(users, user, done)
            else:
                cut = bisect_left(users, user, done)
            if cut > done:
                parts.append(cells.join(split[done:cut]) + cells)
                done = cut
            parts.append(line)
        if done < len(split):
            parts.append(cells.join(split[done:]) + cells)
        return b"".join(parts)

    async def _merge(
        self, ours: list[tuple[int, tuple[int, int]]], theirs: list[tuple[int, int, bytes]]
    ) -> None:
        """Class rows sort by (user, slug), PostgreSQL's rows at the instant come sorted
        so, each with how many class rows of its user sort before it."""
        streams = []
        for k, where in ours:
            ids = self._spool.get(where).split(b"\n")
            users = list(map(int, ids))
            rank, cells = self._classes.rank[k], self._classes.cells[k]
            streams.append([(u, rank, u_id + cells) for u, u_id in zip(users, ids, strict=True)])
        entries = streams[0] if len(streams) == 1 else list(heapq.merge(*streams))
        users = [e[0] for e in entries]
        done = 0
        parts: list[bytes] = []
        for user, before, line in theirs:
            # Class rows of this user with a rank up to `before` come first.
            cut = bisect_left(users, user, done)
            while cut < len(entries) and entries[cut][0] == user and entries[cut][1] <= before:
                cut += 1
            parts.extend(e[2] for e in entries[done:cut])
            parts.append(line)
            done = cut
        parts.extend(e[2] for e in entries[done:])
        await self._sink(b"".join(parts))


class Markers:
    """Passes the CSV through, writing the classes' rows in place of each marker line."""

    def __init__(
        self, sink: Callable[[bytes], Awaitable[None]], token: bytes, instants: Instants | None
    ) -> None:
        self._sink = sink
        self._token = token
        self._instants = instants
        self._carry = b""

    async def feed(self, chunk: bytes) -> None:
        if self._instants is None:
            await self._sink(chunk)
            return
        data = self._carry + chunk if self._carry else chunk
        at = data.find(self._token)
        while at >= 0:
            begin = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            if end < 0:
                break  # the marker's line is not all here yet
            if begin:
                await self._sink(data[:begin])
            tail = data[at + len(self._token) + 1 : end]
            assert self._instants is not None  # nosec B101: markers only with instants
            await self._instants.write(int(tail[: tail.index(b";")]) - 1)
            data = data[end + 1 :]
            at = data.find(self._token)
        # Keep a partial last line: a marker's line may be cut in two.
        cut = data.rfind(b"\n") + 1
        if cut:
            await self._sink(data[:cut])
        self._carry = data[cut:]

    async def close(self) -> None:
        if self._carry:  # the CSV ends with a newline: nothing is left, but in case
            await self._sink(self._carry)
