"""Merchant audiences and promo sync: the rules and the use cases.

An audience is ``(merchant_id, segment_type) -> customer_ids``.  Data engineering sends
them on Kafka (and through the internal endpoint); MPS asks to sync one to CP for a
promo.  The HTTP handlers and the Kafka consumer both call ``AudienceService``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from service.domain.errors import (
    CacheUnavailable,
    CpRejected,
    CpUnavailable,
    DomainError,
    InvalidRequest,
)
from service.domain.ports import CpGateway
from service.domain.rules import USER_ID_MAX, USER_ID_MIN, check_text, is_valid_slug

log = logging.getLogger(__name__)

Operation = Literal["replace", "add", "remove", "patch"]

MAX_PARTS = 10_000


class AudienceNotFound(DomainError):
    code = "audience_not_found"


class AudienceEmpty(DomainError):
    code = "audience_empty"


class PromoConflict(DomainError):
    code = "promo_conflict"


@dataclass(frozen=True, slots=True)
class AudienceKey:
    merchant_id: int
    segment_type: str

    def __str__(self) -> str:
        return f"{self.merchant_id}:{self.segment_type}"


@dataclass(frozen=True, slots=True)
class AudienceInfo:
    key: AudienceKey
    customers: int
    version: int
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class AudienceChange:
    """One change of one audience, from the API or from one Kafka message.

    A ``replace`` may be one part of a snapshot split over several messages
    (``part`` of ``parts``, same ``batch_id``); it takes effect when all parts are in.
    """

    key: AudienceKey
    op: Operation
    add: Sequence[int] = ()
    remove: Sequence[int] = ()
    source: str = "api"
    batch_id: str | None = None
    part: int = 1
    parts: int = 1

    @property
    def is_partial(self) -> bool:
        return self.op == "replace" and self.parts > 1


@dataclass(frozen=True, slots=True)
class StaleSnapshot:
    key: AudienceKey
    batch_id: str
    received: int
    parts: int


@dataclass(frozen=True, slots=True)
class SyncResult:
    promo_id: str
    synced: int
    skipped_over_threshold: int
    cp_segment_id: str


@dataclass(slots=True)
class SyncRecord:
    """What the store knows about a promo's sync."""

    promo_id: str
    key: AudienceKey
    end_date: dt.date
    status: str
    synced: int = 0
    skipped: int = 0
    cp_segment_id: str | None = None
    members: list[int] = field(default_factory=list)


class SyncSession(Protocol):
    """A promo's sync, holding the promo's lock until it ends."""

    async def record(self) -> SyncRecord | None: ...

    async def prepare(
        self, key: AudienceKey, end_date: dt.date, threshold: int, today: dt.date
    ) -> SyncRecord:
        """Fix the customers to push (under the threshold), recorded as `pending`."""
        ...

    async def members(self) -> list[int]: ...

    async def fail(self, error: str) -> None: ...

    async def complete(self, cp_segment_id: str) -> SyncRecord:
        """Count the pushed customers in the ledger and mark the sync done."""
        ...


class AudienceStore(Protocol):
    async def apply(self, change: AudienceChange) -> AudienceInfo | None:
        """Apply one change in its own transaction (None: a snapshot part was staged)."""
        ...

    async def apply_batch(
        self, topic: str, partition: int, changes: Sequence[tuple[int, AudienceChange | None]]
    ) -> int:
        """Apply Kafka messages ``(offset, change)`` of one partition in one transaction
        with the partition's next offset; skip offsets already applied.  A None change
        (a message set aside) only moves the offset.  Returns how many were applied."""
        ...

    async def next_offsets(self, topic: str) -> dict[int, int]: ...

    async def get(self, key: AudienceKey) -> AudienceInfo | None: ...

    async def discard_stale_parts(self, older_than_s: float) -> list[StaleSnapshot]: ...

    def sync_session(self, promo_id: str) -> AbstractAsyncContextManager[SyncSession]: ...

    async def active_sync_count(self, customer_id: int, today: dt.date) -> int: ...

    def active_ledger(
        self, today: dt.date, batch: int
    ) -> AsyncIterator[list[tuple[int, str, dt.date]]]:
        """Ledger rows (customer_id, promo_id, end_date) still counting on ``today``."""
        ...


class CounterCache(Protocol):
    """The Redis mirror of the per-customer counters of active synced segments."""

    async def add_synced(
        self, customer_ids: Sequence[int], promo_id: str, until: float
    ) -> None: ...

    async def synced_count(self, customer_id: int, now: float) -> int | None:
        """None when the cache is not complete (the caller asks PostgreSQL)."""
        ...

    async def write_ledger(self, rows: Sequence[tuple[int, str, float]]) -> None: ...


# -- rules --------------------------------------------------------------------------


def audience_key(merchant_id: int, segment_type: str) -> AudienceKey:
    if not USER_ID_MIN <= merchant_id <= USER_ID_MAX:
        raise InvalidRequest(
            "merchant_id must be an integer in 1..2^63-1", {"merchant_id": merchant_id}
        )
    if not is_valid_slug(segment_type):
        raise InvalidRequest(
            "segment_type must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}",
            {"segment_type": segment_type},
        )
    return AudienceKey(merchant_id, segment_type)


def check_ids(ids: Sequence[int], field_name: str, limit: int) -> None:
    if len(ids) > limit:
        raise InvalidRequest(f"{field_name} holds at most {limit} ids", {"limit": limit})
    for cid in ids:
        if not USER_ID_MIN <= cid <= USER_ID_MAX:
            raise InvalidRequest(
                f"{field_name}: customer ids are integers in 1..2^63-1", {"customer_id": cid}
            )


def check_change(change: AudienceChange, limit: int) -> AudienceChange:
    """Validate a change as a whole (the same rules for the API and Kafka)."""
    audience_key(change.key.merchant_id, change.key.segment_type)
    check_ids(change.add, "customer_ids" if change.op != "patch" else "add", limit)
    check_ids(change.remove, "remove", limit)
    if change.batch_id is not None:
        check_text(change.batch_id, "batch_id", max_length=200)
    if change.op == "patch":
        both = set(change.add) & set(change.remove)
        if both:
            raise InvalidRequest(
                "a customer cannot be both added and removed", {"customer_ids": sorted(both)[:10]}
            )
    if not 1 <= change.part <= change.parts <= MAX_PARTS:
        raise InvalidRequest(
            f"part must be in 1..parts and parts in 1..{MAX_PARTS}",
            {"part": change.part, "parts": change.parts},
        )
    if change.parts > 1 and (change.op != "replace" or not change.batch_id):
        raise InvalidRequest("only a replace with a batch_id can be split into parts")
    return change


def end_of_day(day: dt.date) -> dt.datetime:
    """A promo ends at the end of its end_date, UTC: the first instant of the next day."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)


# -- use cases ----------------------------------------------------------------------


class AudienceService:
    def __init__(
        self,
        store: AudienceStore,
        counters: CounterCache,
        cp: CpGateway,
        *,
        threshold: int = 5,
        max_ids: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._counters = counters
        self._cp = cp
        self._threshold = threshold
        self._max_ids = max_ids
        self._clock = clock
        # Outcomes of sync calls, for metrics.
        self.syncs = {"done": 0, "repeated": 0, "failed": 0}

    async def apply(self, change: AudienceChange) -> AudienceInfo | None:
        return await self._store.apply(check_change(change, self._max_ids))

    async def apply_kafka(
        self, topic: str, partition: int, changes: Sequence[tuple[int, AudienceChange | None]]
    ) -> int:
        """Apply one partition's batch (already validated by the decoder) with its offset."""
        return await self._store.apply_batch(topic, partition, changes)

    async def next_offsets(self, topic: str) -> dict[int, int]:
        return await self._store.next_offsets(topic)

    async def get(self, key: AudienceKey) -> AudienceInfo:
        info = await self._store.get(key)
        if info is None:
            raise AudienceNotFound(f"no audience for {key}", {"audience": str(key)})
        return info

    async def sync(self, key: AudienceKey, promo_id: str, end_date: dt.date) -> SyncResult:
        """Push the audience to CP for a promo, once per promo, counting each customer once.

        The promo's lock is held for the whole sync, so concurrent calls for one promo
        run one after the other and the later ones return the first one's answer.
        """
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        if end_date < today:
            raise InvalidRequest("end_date is in the past", {"end_date": end_date.isoformat()})
        if not is_valid_slug(promo_id):
            raise InvalidRequest(
                "promo_id must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", {"promo_id": promo_id}
            )
        async with self._store.sync_session(promo_id) as session:
            record = await session.record()
            if record is not None and (record.key != key or record.end_date != end_date):
                raise PromoConflict(
                    f"promo {promo_id!r} was synced with another audience or end_date",
                    {"audience": str(record.key), "end_date": record.end_date.isoformat()},
                )
            if record is not None and record.status == "done":
                assert record.cp_segment_id is not None
                self.syncs["repeated"] += 1
                return SyncResult(promo_id, record.synced, record.skipped, record.cp_segment_id)
            if record is None:
                if await self._store.get(key) is None:
                    raise AudienceNotFound(f"no audience for {key}", {"audience": str(key)})
                record = await session.prepare(key, end_date, self._threshold, today)
                if record.synced + record.skipped == 0:
                    raise AudienceEmpty(f"the audience {key} has no customers")
            members = await session.members()
            try:
                cp_segment_id = await self._cp.create_segment(
                    f"mss-promo-{promo_id}", f"{key} promo {promo_id}", end_of_day(end_date)
                )
                await self._cp.add_members(cp_segment_id, members, f"mss-promo-{promo_id}")
            except (CpUnavailable, CpRejected) as exc:
                await session.fail(exc.message)
                self.syncs["failed"] += 1
                raise
            done = await session.complete(cp_segment_id)
            self.syncs["done"] += 1
        try:
            await self._counters.add_synced(members, promo_id, end_of_day(end_date).timestamp())
        except CacheUnavailable:
            log.warning("sync counters not mirrored to Redis; the next rebuild restores them")
        return SyncResult(promo_id, done.synced, done.skipped, cp_segment_id)

    async def sync_count(self, customer_id: int) -> int:
        if not USER_ID_MIN <= customer_id <= USER_ID_MAX:
            raise InvalidRequest(
                "customer_id must be an integer in 1..2^63-1", {"customer_id": customer_id}
            )
        now = self._clock()
        try:
            cached = await self._counters.synced_count(customer_id, now)
        except CacheUnavailable:
            cached = None
        if cached is not None:
            return cached
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        return await self._store.active_sync_count(customer_id, today)

    async def rebuild_counters(self) -> None:
        """Rebuild phase: copy the active ledger into the Redis mirror."""
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        async for rows in self._store.active_ledger(today, 10_000):
            await self._counters.write_ledger(
                [(cid, promo, end_of_day(end).timestamp()) for cid, promo, end in rows]
            )

    async def discard_stale_snapshots(self, older_than_s: float) -> list[StaleSnapshot]:
        stale = await self._store.discard_stale_parts(older_than_s)
        for s in stale:
            log.warning(
                "discarded incomplete snapshot %s of %s: %d of %d parts arrived",
                s.batch_id,
                s.key,
                s.received,
                s.parts,
            )
        return stale
