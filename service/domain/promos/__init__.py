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

The package: ``model`` (errors, records, rules), ``sync`` (``PromoService``: an
attempt, cancel, status), ``counts`` (sync counts and their Redis mirror) and ``upkeep``
(the reconciler's part), which ``PromoService`` inherits.  Its ports (``PromoStore``,
``CounterMirror``) are with the others in ``service/domain/ports.py``.
"""

from service.domain.ports import CounterMirror, PromoStore
from service.domain.promos.counts import SyncCounts
from service.domain.promos.model import (
    Attempt,
    Claim,
    Cleanup,
    CustomerCounts,
    Promo,
    PromoCancelled,
    PromoConflict,
    PromoNotFound,
    PromoState,
    SyncInProgress,
    check_end_date,
    check_promo_id,
    end_of_day,
    external_id,
)
from service.domain.promos.sync import PromoService
from service.domain.promos.upkeep import PromoUpkeep

__all__ = [
    "Attempt",
    "Claim",
    "Cleanup",
    "CounterMirror",
    "CustomerCounts",
    "Promo",
    "PromoCancelled",
    "PromoConflict",
    "PromoNotFound",
    "PromoService",
    "PromoState",
    "PromoStore",
    "PromoUpkeep",
    "SyncCounts",
    "SyncInProgress",
    "check_end_date",
    "check_promo_id",
    "end_of_day",
    "external_id",
]
