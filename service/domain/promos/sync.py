"""The sync use cases: an attempt (claim, CP calls, complete or undo), cancel, status."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.domain.audiences import AudienceKey
from service.domain.errors import (
    CpRejected,
    CpUnavailable,
    OutcomeUnknown,
    StorageUnavailable,
)
from service.domain.log_throttle import ThrottledWarning
from service.domain.ports import CounterMirror, CpGateway, PromoStore
from service.domain.promos.model import (
    Attempt,
    Promo,
    PromoNotFound,
    check_end_date,
    check_promo_id,
    end_of_day,
)
from service.domain.promos.upkeep import PromoUpkeep

# One logger for the package: records keep the name they had as one module.
log = logging.getLogger(__package__)


@dataclass(slots=True)
class _Progress:
    """How far an attempt got in CP: the segment to delete if it must be undone."""

    segment_id: str | None


class PromoService(PromoUpkeep):
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
