"""What a promo sync is made of: its errors, its records, its rules."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from service.domain.audiences import AudienceKey
from service.domain.errors import DomainError, InvalidRequest
from service.domain.rules import check_slug

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


def end_of_day(day: dt.date) -> dt.datetime:
    """A promo ends at the end of its end_date, UTC: the first instant of the next day."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)


def check_promo_id(promo_id: str) -> str:
    return check_slug(promo_id, "promo_id")


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
