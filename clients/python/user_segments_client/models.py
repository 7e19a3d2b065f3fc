"""What the API answers, as msgspec Structs (frozen: results are values).

Fields the service adds later are ignored when decoding, so an older client keeps
working against a newer service.  Timestamps are timezone-aware ``datetime``s (UTC).
"""

from __future__ import annotations

import datetime
from typing import Literal

import msgspec

__all__ = [
    "AddSegment",
    "Audience",
    "ExplanationSource",
    "PromoState",
    "PromoStatus",
    "ReportLink",
    "Rule",
    "Segment",
    "SegmentExplanation",
    "SyncResult",
]


class Segment(msgspec.Struct, frozen=True):
    """A live segment."""

    slug: str
    description: str
    auto_percent: float | None
    """Share of all users the segment includes by its percentage rule; ``None``: no rule."""
    created_at: datetime.datetime


class AddSegment(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One item of ``update_user_segments(add=...)`` with an expiry: ``ttl_seconds`` from
    now, or an absolute ``expires_at`` (timezone-aware, in the future), not both.  A plain
    slug in ``add`` means "no expiry"; re-adding a membership replaces its expiry."""

    slug: str
    ttl_seconds: int | None = None
    expires_at: datetime.datetime | None = None

    def __post_init__(self) -> None:
        if self.ttl_seconds is not None and self.expires_at is not None:
            raise ValueError("give ttl_seconds or expires_at, not both")
        if self.expires_at is not None and self.expires_at.utcoffset() is None:
            raise ValueError("expires_at must be timezone-aware")


class Rule(msgspec.Struct, frozen=True):
    """A segment's percentage rule as it applies to one user."""

    auto_percent: float
    bucket: int
    """The user's bucket, 0..9999: the rule includes them when ``bucket < auto_percent * 100``."""


ExplanationSource = Literal["explicit", "rule", "explicit+rule", "excluded"]


class SegmentExplanation(msgspec.Struct, frozen=True):
    """Why a user is or is not in one segment (``explain_user_segments``)."""

    slug: str
    included: bool
    source: ExplanationSource
    """``explicit``: a membership; ``rule``: the percentage rule; ``explicit+rule``: both;
    ``excluded``: an explicit removal that wins over the rule."""
    expires_at: datetime.datetime | None = None
    """The explicit membership's expiry, when it has one."""
    rule: Rule | None = None
    """The segment's percentage rule and the user's bucket, when the segment has a rule."""
    since: datetime.datetime | None = None
    """When what a reader sees last changed (from history), when known."""


class Audience(msgspec.Struct, frozen=True):
    """A merchant audience: its size, version and last change."""

    merchant_id: int
    segment_type: str
    customers: int
    """How many customers the audience holds."""
    version: int
    updated_at: datetime.datetime | None = None


class SyncResult(msgspec.Struct, frozen=True):
    """The outcome of syncing one audience to CP for one promo."""

    promo_id: str
    synced: int
    """Customers in the promo's CP segment."""
    skipped_over_threshold: int
    """Customers left out because they are already in too many active promo segments."""
    cp_segment_id: str | None
    """The promo's CP segment; ``None`` when no customer passed the threshold, in which
    case nothing was created in CP."""


PromoState = Literal["in_progress", "synced", "failed", "cancelled"]


class PromoStatus(msgspec.Struct, frozen=True):
    """What the service knows about one promo's sync."""

    promo_id: str
    merchant_id: int
    segment_type: str
    end_date: datetime.date
    """The promo's CP segment expires at the end of this day (UTC)."""
    state: PromoState
    synced: int
    skipped_over_threshold: int
    cp_segment_id: str | None
    attempts: int
    """Sync attempts so far (calls and the service's own retries)."""
    last_error: str | None
    """Why the last attempt failed, if it did."""
    updated_at: datetime.datetime


class ReportLink(msgspec.Struct, frozen=True):
    """A signed link to a month of membership history as CSV; it opens without a token
    until ``expires_at``."""

    url: str
    expires_at: datetime.datetime


# Envelopes the client unwraps.


class _UserSegments(msgspec.Struct):
    user_id: int
    segments: list[str]


class _UserExplanation(msgspec.Struct):
    user_id: int
    segments: list[SegmentExplanation]


class _SegmentList(msgspec.Struct):
    segments: list[Segment]


class _BatchSegments(msgspec.Struct):
    users: dict[int, list[str]]


class _SyncCount(msgspec.Struct):
    customer_id: int
    active_synced_segments: int
