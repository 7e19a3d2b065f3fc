"""The reconciler's part of promo syncs: abandoned attempts undone, CP segments of
failed attempts deleted, failed mirror writes retried."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Sequence

from service.domain.errors import CpRejected, CpUnavailable, StorageUnavailable
from service.domain.ports import CpGateway
from service.domain.promos.counts import SyncCounts
from service.domain.promos.model import Cleanup

# One logger for the package: records keep the name they had as one module.
log = logging.getLogger(__package__)


class PromoUpkeep(SyncCounts):
    """Clean-ups and reconciler rounds (state set in ``PromoService.__init__``)."""

    _cp: CpGateway
    deadline_s: float
    syncs: dict[str, int]

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
