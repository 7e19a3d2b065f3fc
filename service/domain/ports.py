"""What the domain needs from the outside world.  Adapters in ``persistence/`` and
``cache/`` implement these; tests use in-memory fakes of them."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from service.domain.history import ExplainInputs
from service.domain.model import (
    AppliedChange,
    CachedUser,
    Registry,
    Segment,
    UserChange,
    UserState,
)


class HistorySource(Protocol):
    async def history_csv(
        self,
        start: dt.datetime,
        end: dt.datetime,
        user_id: int | None,
        formula_starts: Sequence[str],
        sink: Callable[[bytes], Awaitable[None]],
        labels: tuple[str, str] = ("add", "remove"),
    ) -> None:
        """Write every change a reader saw in [start, end) to ``sink`` as CSV rows
        ``user_id;segment;operation;timestamp`` in time order, neutralising formula
        cells; ``labels`` name the operations add and remove."""
        ...

    async def explain_inputs(self, user_id: int) -> ExplainInputs:
        """The user's segments, stored state and last visible changes, in one snapshot."""
        ...


class Store(Protocol):
    """The source of truth (PostgreSQL).  Every method is one transaction."""

    async def create_segment(self, slug: str, description: str, auto_bp: int | None) -> Segment: ...

    async def list_segments(self) -> list[Segment]: ...

    async def get_segment(self, slug: str) -> Segment | None: ...

    async def update_segment(
        self, slug: str, *, description: str | None, auto_bp: int | None, set_auto: bool
    ) -> Segment: ...

    async def delete_segment(self, slug: str) -> Segment:
        """Soft-delete and end every membership, with history.  Raises SegmentNotFound."""
        ...

    async def apply_change(
        self, change: UserChange, expiries: Sequence[float | None]
    ) -> AppliedChange:
        """Apply a validated change atomically and return the user's state after it.

        ``expiries`` are the resolved expiries of ``change.add``, in order.  Raises
        SegmentNotFound, listing every unknown slug, and changes nothing then.
        """
        ...

    async def user_state(self, user_id: int) -> UserState: ...

    async def user_states_of(self, user_ids: Sequence[int]) -> list[UserState]: ...

    async def sweep_expired(self, limit: int) -> list[UserState]:
        """End expired memberships of up to ``limit`` users; return their new states."""
        ...

    async def ensure_history_partitions(self, months_ahead: int = 3) -> None: ...

    async def registry(self) -> Registry: ...

    def user_states(self, batch_size: int) -> AsyncIterator[list[UserState]]:
        """Every user with memberships or exclusions, in batches (for cache rebuilds)."""
        ...


class Cache(Protocol):
    """The serving copy (Redis).  Writes are versioned: older states never win."""

    async def read_user(self, user_id: int, now: float) -> CachedUser | None:
        """The user's unexpired memberships, or None when the cache is not complete.

        Raises CacheUnavailable when Redis does not answer in time.
        """
        ...

    async def read_users(self, user_ids: Sequence[int], now: float) -> list[CachedUser] | None:
        """Many users in one round trip; None when the cache is not complete."""
        ...

    async def write_users(self, states: Sequence[UserState]) -> None: ...

    async def read_registry(self) -> Registry | None: ...

    async def write_registry(self, registry: Registry) -> None: ...

    async def begin_rebuild(self, lease_s: float) -> str | None:
        """Take the rebuild lease; return a generation token, or None if held elsewhere."""
        ...

    async def renew_rebuild(self, generation: str, lease_s: float) -> bool:
        """Extend the lease; False if it was lost (the rebuild must stop)."""
        ...

    async def release_rebuild(self, generation: str) -> None:
        """Give the lease up (a rebuild that failed), so the next one need not wait."""
        ...

    async def finish_rebuild(self, generation: str) -> bool:
        """Mark the cache complete, unless it was flushed since ``begin_rebuild``."""
        ...

    async def is_complete(self) -> bool: ...

    async def invalidate(self) -> None:
        """Drop the completeness marker so readers fall back until the next rebuild."""
        ...


class CpGateway(Protocol):
    """The downstream targeting service ("CP").  Contract: docs/cp-contract.md.

    Every call is idempotent (by external id, or by an idempotency key), so a retry
    after a lost response never applies anything twice.  ``deadline`` is a
    ``time.monotonic()`` instant after which no attempt starts (CpUnavailable then).
    """

    async def create_segment(
        self, external_id: str, name: str, expires_at: dt.datetime, *, deadline: float | None
    ) -> str:
        """Create (or find) the CP segment for ``external_id``, setting its expiry;
        return CP's segment id."""
        ...

    async def add_members(
        self,
        segment_id: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        *,
        deadline: float | None,
    ) -> None: ...

    async def remove_members(
        self,
        segment_id: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        *,
        deadline: float | None,
    ) -> None: ...

    async def delete_segment(self, segment_id: str, *, deadline: float | None) -> None:
        """Delete the segment; an unknown segment counts as deleted."""
        ...
