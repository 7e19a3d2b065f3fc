"""What the domain needs from the outside world, in one place.  Adapters in
``persistence/``, ``cache/`` and ``service/cp/`` implement these; tests use in-memory
fakes of them (``tests/fakes.py``).

Each service asks for the narrow port it uses (``Store``, ``ReconcileStore``,
``AudienceStore``...); the composition root (``service/bootstrap.py``) holds each
server through the union of them (``Database``, ``CacheServer``, ``CpConnection``),
which also says how to ping and close it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from service.domain.history import ExplainInputs
from service.domain.model import (
    AppliedChange,
    CachedUser,
    Registry,
    Segment,
    UserChange,
    UserState,
)

if TYPE_CHECKING:  # records only; importing them here at run time would be circular
    from service.domain.audiences import (
        AudienceChange,
        AudienceInfo,
        AudienceKey,
        StaleSnapshot,
    )
    from service.domain.promos.model import Claim, Cleanup, CustomerCounts, Promo

# -- segments and memberships --------------------------------------------------------


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

    async def user_states_for_read(
        self, user_ids: Sequence[int]
    ) -> tuple[dict[int, UserState], int]:
        """The users' states and the registry's version, from one snapshot."""
        ...

    async def user_states_of(self, user_ids: Sequence[int]) -> list[UserState]: ...

    async def sweep_expired(self, limit: int) -> list[UserState]:
        """End expired memberships of up to ``limit`` users; return their new states."""
        ...

    async def ensure_history_partitions(self, months_ahead: int = 3) -> None: ...

    async def registry(self) -> Registry: ...

    def user_states(self, batch_size: int, after: int = 0) -> AsyncIterator[list[UserState]]:
        """Every user above ``after`` PostgreSQL has a version for, those with no
        memberships too, in batches in user order (for cache rebuilds)."""
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

    async def begin_rebuild(self, lease_s: float, generation: str | None = None) -> str | None:
        """Take the rebuild lease under ``generation`` (a new token if None) and return
        it; None if held under another.  A lease already held under ``generation`` is
        taken: a retry after a lost reply must not lock its own rebuild out."""
        ...

    async def renew_rebuild(self, generation: str, lease_s: float) -> bool:
        """Extend the lease; False if it was lost (the rebuild must stop)."""
        ...

    async def release_rebuild(self, generation: str) -> None:
        """Give the lease up (a rebuild that failed), so the next one need not wait."""
        ...

    async def progress_mark(self, user_id: int) -> int | None:
        """How far a rebuild has come in ``user_id``'s bucket (its ``rebuilt_to``, 0 if
        none); None when that bucket is complete."""
        ...

    async def resume_point(self, generation: str) -> int:
        """The user id up to which an interrupted rebuild's writes stand and this one
        took them over (no flush or restart since); 0: start from the first user."""
        ...

    async def mark_rebuilt(self, generation: str, upto_user_id: int) -> bool:
        """Users up to ``upto_user_id`` are written by this rebuild: reads may use them."""
        ...

    async def finish_rebuild(self, generation: str) -> bool:
        """Mark the cache complete, unless it was flushed since ``begin_rebuild``."""
        ...

    async def is_complete(self) -> bool: ...

    async def invalidate(self) -> None:
        """Drop the completeness marker so readers fall back until the next rebuild."""
        ...


class ReconcileStore(Protocol):
    """What the reconciler reads of PostgreSQL to repair the Redis copy."""

    async def drain_outbox(
        self, limit: int, min_age_s: float, apply: Callable[[list[UserState]], Awaitable[None]]
    ) -> int: ...

    async def scan_versions(
        self, after_user_id: int, limit: int
    ) -> list[tuple[int, int, bool]]: ...

    async def user_states_of(self, user_ids: Sequence[int]) -> list[UserState]: ...


class ReconcileCache(Protocol):
    """What the reconciler compares and repairs in Redis."""

    async def write_users(self, states: Sequence[UserState]) -> None: ...

    async def versions(self, user_ids: Sequence[int]) -> list[int | None]: ...

    async def record_reconcile(
        self, found: int, repaired: int, confirmed_at: float | None
    ) -> None: ...

    async def freshness(self) -> dict[str, float]:
        """What ``record_reconcile`` last kept (``synchronized_on`` and the divergence
        counters), for the probes and the cache gauges."""
        ...

    async def is_complete(self) -> bool: ...


# -- merchant audiences ---------------------------------------------------------------


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


# -- promo syncs ------------------------------------------------------------------------


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


# -- whole servers: how the composition root holds each adapter ------------------------


class StoreFigures(Protocol):
    """Operational figures of PostgreSQL, for metrics only: no answer depends on them."""

    async def count_users(self) -> int:
        """Users PostgreSQL knows (may be estimated when there are many)."""
        ...

    async def outbox_backlog(self) -> dict[str, tuple[int, float]]:
        """Each outbox's rows (counted up to a cap) and the age of its oldest row in
        seconds (0 when empty)."""
        ...

    def pool_counts(self) -> dict[str, int]:
        """The connection pool's gauges and the write path's running counts."""
        ...


class Database(Store, HistorySource, ReconcileStore, Protocol):
    """PostgreSQL as the services use it (``PgStore``)."""

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class CacheServer(Cache, ReconcileCache, CounterMirror, Protocol):
    """Redis as the services use it (``RedisCache``)."""

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class CpConnection(CpGateway, Protocol):
    """CP as the services use it (``CpClient``), with its call counts for metrics."""

    @property
    def calls(self) -> Mapping[str, int]: ...

    async def close(self) -> None: ...
