"""Promo syncs, slot reservations, the sync ledger and CP clean-ups in PostgreSQL.

Every method is one short transaction; none is open while CP is called.  Locks are
always taken in the same order, so concurrent syncs, completions and cancels of
overlapping audiences cannot deadlock: the promo's row first, then its customers'
``sync_customers`` rows in ascending id order.

The store's parts: ``claims`` (starting an attempt), ``outcomes`` (completing, failing,
cancelling; the CP clean-ups), ``counts`` (the ledger's counts and the mirror's
outbox); ``sql`` holds what they share.
"""

from persistence.promos.claims import PromoClaims
from persistence.promos.counts import PromoCounts


class PgPromoStore(PromoClaims, PromoCounts):
    """The promo store (``service.domain.promos.PromoStore``) in PostgreSQL."""


__all__ = ["PgPromoStore"]
