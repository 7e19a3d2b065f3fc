"""What promo syncs need of storage: the store of record and the Redis count mirror."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from service.domain.audiences import AudienceKey
from service.domain.promos.model import Claim, Cleanup, CustomerCounts, Promo


class PromoStore(Protocol):
    """Promo state, slot reservations and the sync ledger (PostgreSQL).  Every method
    is one short transaction."""

    async def claim(
        self,
        promo_id: str,
        key: AudienceKey,
        end_date: dt.date,
        *,
        threshold: int,
        today: dt.date,
        lease_s: float,
        token: str,
    ) -> Claim:
        """Start an attempt: reserve the slots of customers entering the promo (under
        the threshold), mark those leaving, take the lease.  Answers ``done`` when
        nothing needs CP (unchanged, or nobody passed the threshold).  Raises
        PromoConflict, PromoCancelled, SyncInProgress, AudienceNotFound, AudienceEmpty."""
        ...

    async def record_segment(self, promo_id: str, token: str, segment_id: str) -> bool:
        """Remember the attempt's CP segment (for undo); False if the attempt lost its
        lease."""
        ...

    async def complete(self, promo_id: str, token: str) -> tuple[Promo, list[int]] | None:
        """Make the attempt's reservations count, release the leavers; the promo and the
        customers whose counts changed.  None if the attempt lost its lease."""
        ...

    async def fail(
        self,
        promo_id: str,
        token: str,
        error: str,
        external_id: str | None,
        segment_id: str | None,
    ) -> tuple[list[Cleanup], list[int]]:
        """Undo the attempt (if it still holds the promo): release every slot of the
        promo, state ``failed``, and list its CP segments for deletion.  The attempt's
        own segment (``external_id``, when given) is listed in any case.  Returns the
        promo's pending clean-ups and the customers whose counts changed."""
        ...

    async def cancel(self, promo_id: str) -> tuple[list[Cleanup], list[int]]:
        """State ``cancelled``, slots released, the CP segment listed for deletion.
        Raises PromoNotFound, SyncInProgress."""
        ...

    async def get(self, promo_id: str) -> Promo | None: ...

    async def expired_attempts(self, limit: int) -> list[tuple[str, str]]:
        """(promo_id, token) of attempts whose lease has passed (a crash or a stall)."""
        ...

    async def pending_cleanups(self, limit: int) -> list[Cleanup]: ...

    async def cleanup_done(self, cleanup_id: int) -> None: ...

    async def cleanup_failed(self, cleanup_id: int, error: str) -> None: ...

    async def counts_of(self, customer_ids: Sequence[int], today: dt.date) -> list[CustomerCounts]:
        """Each customer's counted promos and version, in one snapshot."""
        ...

    async def confirm_mirrored(self, counts: Sequence[CustomerCounts]) -> None:
        """Drop outbox rows the mirror now holds (at their version or newer)."""
        ...

    async def counter_outbox(self, min_age_s: float, limit: int) -> list[int]: ...

    async def active_sync_count(self, customer_id: int, today: dt.date) -> int: ...

    async def counter_versions(
        self, after_customer_id: int, limit: int, today: dt.date
    ) -> list[tuple[int, int, bool]]:
        """(customer_id, version, counted in any active promo), in id order."""
        ...

    def all_counts(self, today: dt.date, batch: int) -> AsyncIterator[list[CustomerCounts]]:
        """Every customer with an active count, in batches (for mirror rebuilds)."""
        ...


class CounterMirror(Protocol):
    """The Redis copy of the per-customer counts; writes are versioned."""

    async def write_counts(self, counts: Sequence[CustomerCounts]) -> None: ...

    async def synced_count(self, customer_id: int, now: float) -> int | None:
        """None when the copy is not complete (the caller asks PostgreSQL)."""
        ...

    async def count_versions(self, customer_ids: Sequence[int]) -> list[int | None]: ...
