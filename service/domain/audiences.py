"""Merchant audiences: the rules and the use cases.

An audience is ``(merchant_id, segment_type) -> customer_ids``.  Data engineering sends
them on Kafka (and through the internal endpoint); MPS syncs one to CP for a promo
(``service/domain/promos/``).  The HTTP handlers and the Kafka consumer both call
``AudienceService``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from service.domain.errors import DomainError, InvalidRequest
from service.domain.ports import AudienceStore
from service.domain.rules import (
    ID_RANGE_SHORT,
    check_id,
    check_slug,
    check_text,
    is_valid_user_id,
)

log = logging.getLogger(__name__)

Operation = Literal["replace", "add", "remove", "patch"]

MAX_PARTS = 10_000


class AudienceNotFound(DomainError):
    code = "audience_not_found"


class AudienceEmpty(DomainError):
    code = "audience_empty"


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


# -- rules --------------------------------------------------------------------------


def audience_key(merchant_id: int, segment_type: str) -> AudienceKey:
    check_id(merchant_id, "merchant_id", ID_RANGE_SHORT)
    return AudienceKey(merchant_id, check_slug(segment_type, "segment_type"))


def check_ids(ids: Sequence[int], field_name: str, limit: int) -> None:
    if len(ids) > limit:
        raise InvalidRequest(f"{field_name} holds at most {limit} ids", {"limit": limit})
    for cid in ids:
        if not is_valid_user_id(cid):
            raise InvalidRequest(
                f"{field_name}: customer ids are integers in {ID_RANGE_SHORT}", {"customer_id": cid}
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


# -- use cases ----------------------------------------------------------------------


class AudienceService:
    def __init__(
        self,
        store: AudienceStore,
        *,
        max_ids: int = 1_000_000,
    ) -> None:
        self._store = store
        self._max_ids = max_ids

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
