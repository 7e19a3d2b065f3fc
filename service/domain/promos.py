"""Promo sync: push a merchant audience to CP for a promo, under a per-customer cap.

What MPS is told is what holds:

* A sync answered 200 is in force: CP holds exactly the customers reported, each
  counted (one slot of the threshold) until the promo's end date.
* A sync answered an error is not: the attempt is undone before the answer (counts
  released, its CP segment deleted), and where CP cannot be reached for the undo, the
  reconciler deletes the segment later.  Nothing ever completes a failed attempt.
* An attempt that never answers (a crash, a stall) holds a lease; once the lease has
  passed, the reconciler undoes it like a failure.

An attempt holds no database connection while it talks to CP: it claims the promo and
reserves its customers' slots in one short transaction, calls CP, then completes (or
fails) in another, fenced by the attempt's token so that a late attempt cannot
overwrite what the reconciler decided meanwhile.

The threshold ``T`` is the most active synced promos a customer may be counted in; slots
reserved by attempts in flight count too.  The seed's "skip customers with more than
threshold synced segments" is ``count >= T`` here: a customer already in ``T`` promos is
skipped, so nobody is ever counted in more than ``T``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from service.domain.audiences import AudienceKey
from service.domain.errors import (
    CacheUnavailable,
    CpRejected,
    CpUnavailable,
    DomainError,
    InvalidRequest,
    OutcomeUnknown,
    StorageUnavailable,
)
from service.domain.log_throttle import ThrottledWarning
from service.domain.ports import CpGateway
from service.domain.rules import USER_ID_MAX, USER_ID_MIN, is_valid_slug

log = logging.getLogger(__name__)

PromoState = Literal["in_progress", "synced", "failed", "cancelled"]


class PromoConflict(DomainError):
    """The promo id was used for another audience."""

    code = "promo_conflict"


class PromoNotFound(DomainError):
    code = "promo_not_found"


class PromoCancelled(DomainError):
    code = "promo_cancelled"


class SyncInProgress(DomainError):
    """Another attempt holds the promo; ``details["retry_after_s"]`` says when to retry."""

    code = "sync_in_progress"


# -- what the store and the mirror hold -------------------------------------------


@dataclass(frozen=True, slots=True)
class Promo:
    promo_id: str
    key: AudienceKey
    end_date: dt.date
    state: PromoState
    synced: int
    skipped: int
    cp_segment_id: str | None
    attempts: int
    last_error: str | None
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a claimed attempt must do in CP before it can complete."""

    promo: Promo
    token: str
    external_id: str
    # The CP segment in force (an update), or None: the attempt creates one.
    cp_segment_id: str | None
    set_expiry: bool
    add: Sequence[int] = ()
    remove: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class Cleanup:
    """A CP segment to delete (``segment_id`` None: only its external id is known)."""

    id: int
    promo_id: str
    external_id: str
    segment_id: str | None


@dataclass(frozen=True, slots=True)
class CustomerCounts:
    """A customer's counted promos (promo id -> end date), at a version of the ledger."""

    customer_id: int
    version: int
    promos: dict[str, dt.date] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a promo: a final answer, or an attempt to run."""

    done: Promo | None = None
    attempt: Attempt | None = None


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


# -- rules --------------------------------------------------------------------------


def end_of_day(day: dt.date) -> dt.datetime:
    """A promo ends at the end of its end_date, UTC: the first instant of the next day."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)


def check_promo_id(promo_id: str) -> str:
    if not is_valid_slug(promo_id):
        raise InvalidRequest(
            "promo_id must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", {"promo_id": promo_id}
        )
    return promo_id


def check_end_date(end_date: dt.date, today: dt.date, horizon_days: int) -> dt.date:
    last = today + dt.timedelta(days=horizon_days)
    if not today <= end_date <= last:
        raise InvalidRequest(
            f"end_date must be today or later and at most {horizon_days} days ahead",
            {"end_date": end_date.isoformat(), "min": today.isoformat(), "max": last.isoformat()},
        )
    return end_date


def external_id(promo_id: str, attempt: int) -> str:
    """Each fresh attempt gets its own CP segment, so undoing one attempt can never
    delete a later attempt's segment."""
    return f"mss-promo-{promo_id}-{attempt}"


# -- use cases ----------------------------------------------------------------------


@dataclass(slots=True)
class _Progress:
    """How far an attempt got in CP: the segment to delete if it must be undone."""

    segment_id: str | None


class PromoService:
    def __init__(
        self,
        store: PromoStore,
        mirror: CounterMirror,
        cp: CpGateway,
        *,
        threshold: int = 5,
        deadline_s: float = 10.0,
        horizon_days: int = 366,
        undo_budget_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._mirror = mirror
        self._cp = cp
        self.threshold = threshold
        self.deadline_s = deadline_s
        self.horizon_days = horizon_days
        self._undo_budget_s = undo_budget_s
        self._clock = clock
        # Outcomes of sync calls and reconciler work, for metrics.
        self.syncs = {"done": 0, "repeated": 0, "failed": 0, "undone": 0, "cancelled": 0}
        self.errors = {"cleanup": 0, "abandon": 0, "mirror": 0}
        self._warn_mirror = ThrottledWarning(
            log, "sync counts not mirrored to Redis; the reconciler retries"
        )

    @property
    def lease_s(self) -> float:
        # Past the deadline an attempt only writes its own failure; the margin covers
        # that, so the reconciler does not race an attempt that is still undoing.
        return self.deadline_s + self._undo_budget_s + min(5.0, self.deadline_s / 2)

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()

    async def sync(self, key: AudienceKey, promo_id: str, end_date: dt.date) -> Promo:
        """Bring the promo's CP segment in line with the audience and end date.

        Returns the promo as synced; raises CpUnavailable / CpRejected after undoing
        the attempt (nothing of it is in force)."""
        check_promo_id(promo_id)
        today = self._today()
        check_end_date(end_date, today, self.horizon_days)
        deadline = time.monotonic() + self.deadline_s
        token = secrets.token_hex(16)
        claim = await self._store.claim(
            promo_id,
            key,
            end_date,
            threshold=self.threshold,
            today=today,
            lease_s=self.lease_s,
            token=token,
        )
        if claim.done is not None:
            self.syncs["repeated"] += 1
            return claim.done
        attempt = claim.attempt
        assert attempt is not None
        progress = _Progress(attempt.cp_segment_id)
        try:
            await self._push(attempt, deadline, progress)
        except (CpUnavailable, CpRejected) as exc:
            await self._undo(attempt, progress.segment_id, exc.message)
            raise
        segment_id = progress.segment_id
        try:
            completed = await self._store.complete(promo_id, token)
        except OutcomeUnknown as exc:
            # The commit may or may not have happened: say so.  A retry of the same
            # promo_id, or GET /v1/promos/{id}, tells; an attempt that did not commit
            # is undone by the reconciler once its lease passes.
            raise OutcomeUnknown(
                "PostgreSQL failed while completing the sync; its outcome is unknown:"
                " retry the same promo_id or read GET /v1/promos/{promo_id}",
                {"promo_id": promo_id, "retry_after_s": 1},
            ) from exc
        except StorageUnavailable:
            # Rolled back for certain: undo the attempt now (or, if PostgreSQL is still
            # away, the reconciler does once the lease passes).
            await self._undo(attempt, segment_id, "PostgreSQL failed while completing")
            raise
        if completed is None:
            # The lease passed and the reconciler undid the attempt meanwhile.
            await self._undo(attempt, segment_id, "the sync deadline passed")
            raise CpUnavailable(
                "the sync did not finish before its deadline; nothing is in force",
                {"promo_id": promo_id, "deadline_s": self.deadline_s},
            )
        promo, changed = completed
        self.syncs["done"] += 1
        await self._mirror_counts(changed)
        return promo

    async def _push(self, attempt: Attempt, deadline: float, progress: _Progress) -> None:
        """The attempt's CP calls, all within the deadline."""
        promo = attempt.promo
        name = f"{promo.key} promo {promo.promo_id}"
        expires = end_of_day(promo.end_date)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                segment_id = attempt.cp_segment_id
                if segment_id is None or attempt.set_expiry:
                    segment_id = await self._cp.create_segment(
                        attempt.external_id, name, expires, deadline=deadline
                    )
                    if attempt.cp_segment_id is None:
                        progress.segment_id = segment_id
                        if not await self._store.record_segment(
                            promo.promo_id, attempt.token, segment_id
                        ):
                            raise CpUnavailable(
                                "the sync did not finish before its deadline",
                                {"promo_id": promo.promo_id},
                            )
                keys = f"{attempt.external_id}:{attempt.token}"
                if attempt.add:
                    await self._cp.add_members(
                        segment_id, attempt.add, f"{keys}:add", deadline=deadline
                    )
                if attempt.remove:
                    await self._cp.remove_members(
                        segment_id, attempt.remove, f"{keys}:remove", deadline=deadline
                    )
        except TimeoutError as exc:
            raise CpUnavailable(
                f"CP did not finish the sync within its {self.deadline_s:g} s deadline",
                {"promo_id": promo.promo_id, "deadline_s": self.deadline_s},
            ) from exc
        except StorageUnavailable as exc:
            # Recording the segment failed: the attempt cannot complete.  Undo it.
            raise CpUnavailable(
                "the sync could not record its progress; nothing is in force",
                {"promo_id": promo.promo_id},
            ) from exc

    async def _undo(self, attempt: Attempt, segment_id: str | None, error: str) -> None:
        """Release the attempt's slots and delete its CP segment, before answering."""
        self.syncs["failed"] += 1
        try:
            cleanups, changed = await self._store.fail(
                attempt.promo.promo_id, attempt.token, error, attempt.external_id, segment_id
            )
        except StorageUnavailable:
            log.warning(
                "promo %s: could not record the failed attempt; the reconciler undoes it"
                " once its lease passes",
                attempt.promo.promo_id,
            )
            return
        await self._mirror_counts(changed)
        await self.run_cleanups(cleanups, time.monotonic() + self._undo_budget_s)

    async def cancel(self, promo_id: str) -> None:
        check_promo_id(promo_id)
        cleanups, changed = await self._store.cancel(promo_id)
        self.syncs["cancelled"] += 1
        await self._mirror_counts(changed)
        # The cancellation is decided (and answered) whether or not CP answers now;
        # the reconciler deletes what is left.
        await self.run_cleanups(cleanups, time.monotonic() + self.deadline_s)

    async def status(self, promo_id: str) -> Promo:
        check_promo_id(promo_id)
        promo = await self._store.get(promo_id)
        if promo is None:
            raise PromoNotFound(f"no promo {promo_id!r}", {"promo_id": promo_id})
        return promo

    # -- counts -------------------------------------------------------------------

    async def sync_count(self, customer_id: int) -> int:
        if not USER_ID_MIN <= customer_id <= USER_ID_MAX:
            raise InvalidRequest(
                "customer_id must be an integer in 1..2^63-1", {"customer_id": customer_id}
            )
        now = self._clock()
        try:
            cached = await self._mirror.synced_count(customer_id, now)
        except CacheUnavailable:
            cached = None
        if cached is not None:
            return cached
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        return await self._store.active_sync_count(customer_id, today)

    async def _mirror_counts(self, customer_ids: Sequence[int]) -> None:
        """Write-through of changed counts; the outbox row stays for the reconciler if
        this fails."""
        try:
            await self.mirror_customers(customer_ids)
        except (CacheUnavailable, StorageUnavailable) as exc:
            self.errors["mirror"] += 1
            self._warn_mirror(exc)

    async def mirror_customers(self, customer_ids: Sequence[int], batch: int = 10_000) -> None:
        today = self._today()
        for start in range(0, len(customer_ids), batch):
            counts = await self._store.counts_of(customer_ids[start : start + batch], today)
            await self._mirror.write_counts(counts)
            await self._store.confirm_mirrored(counts)

    async def rebuild_counters(self) -> None:
        """Rebuild phase of the cache: copy every active count into the mirror."""
        async for counts in self._store.all_counts(self._today(), 10_000):
            await self._mirror.write_counts(counts)

    # -- the reconciler's part ------------------------------------------------------

    async def run_cleanups(self, cleanups: Sequence[Cleanup], deadline: float) -> int:
        """Delete CP segments; each failure is kept for the next round.  Returns how
        many were deleted."""
        deleted = 0
        for item in cleanups:
            try:
                segment_id = item.segment_id
                if segment_id is None:
                    # The attempt's answer to create was lost: find the segment by its
                    # external id (creating it if it never existed), then delete it.
                    segment_id = await self._cp.create_segment(
                        item.external_id,
                        f"undo {item.promo_id}",
                        dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
                        deadline=deadline,
                    )
                await self._cp.delete_segment(segment_id, deadline=deadline)
                await self._store.cleanup_done(item.id)
                deleted += 1
            except (CpUnavailable, CpRejected, StorageUnavailable) as exc:
                self.errors["cleanup"] += 1
                log.warning("promo %s: CP segment not deleted yet: %s", item.promo_id, exc)
                with contextlib.suppress(StorageUnavailable):
                    await self._store.cleanup_failed(item.id, str(exc))
            except Exception:
                # Anything else is a bug, but it must not keep the other segments of
                # this round from being deleted.
                self.errors["cleanup"] += 1
                log.exception("promo %s: deleting its CP segment raised", item.promo_id)
        return deleted

    async def reconcile(self, *, cleanup_batch: int = 100, outbox_min_age_s: float = 1.0) -> None:
        """One round: undo abandoned attempts, delete what failed attempts left in CP,
        and retry count mirror writes that failed.  One bad item never stops the rest."""
        for promo_id, token in await self._store.expired_attempts(100):
            log.warning("promo %s: attempt abandoned (lease passed); undoing it", promo_id)
            try:
                cleanups, changed = await self._store.fail(
                    promo_id, token, "abandoned: the attempt passed its deadline", None, None
                )
            except Exception:
                # One promo's trouble must not stop the others' (or the next step's).
                self.errors["abandon"] += 1
                log.exception("promo %s: undoing the abandoned attempt failed", promo_id)
                continue
            self.syncs["undone"] += 1
            await self._mirror_counts(changed)
            await self.run_cleanups(cleanups, time.monotonic() + self.deadline_s)
        pending = await self._store.pending_cleanups(cleanup_batch)
        if pending:
            await self.run_cleanups(pending, time.monotonic() + self.deadline_s)
        while customers := await self._store.counter_outbox(outbox_min_age_s, 10_000):
            await self.mirror_customers(customers)
            if len(customers) < 10_000:
                break

    async def scan_counts(self, batch: int = 1000) -> int:
        """Compare every customer's count version in PostgreSQL and Redis; repair the
        ones behind.  Returns how many were repaired."""
        today = self._today()
        after = repaired = 0
        while rows := await self._store.counter_versions(after, batch, today):
            after = rows[-1][0]
            cached = await self._mirror.count_versions([cid for cid, _, _ in rows])
            behind = [
                cid
                for (cid, version, active), rv in zip(rows, cached, strict=True)
                if (rv is None and active) or (rv is not None and rv < version)
            ]
            if behind:
                log.warning("sync count mirror: %d customers behind; repairing", len(behind))
                await self.mirror_customers(behind)
                repaired += len(behind)
        return repaired
