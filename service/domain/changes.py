"""Planning a change of one user's memberships: what to write and which facts to log.

Pure functions: the store reads the user's current rows under a lock, asks
``plan_change`` what to do, and executes the plan in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.domain.history import EXCLUSION, MEMBER, RENEW
from service.domain.model import UserChange


@dataclass(frozen=True, slots=True)
class SegmentRef:
    id: int
    slug: str
    auto_bp: int | None


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """An explicit fact for ``membership_history`` (see service/domain/history.py)."""

    occurred_at: float
    segment_id: int
    slug: str
    operation: str  # "add" | "remove": toward "in" / toward "out"
    cause: str  # "api", "renew", "expiry", "segment_deleted", ...
    kind: str = MEMBER  # MEMBER: a membership begins/ends; EXCLUSION: an exclusion ends/begins
    expires_at: float | None = None  # of a membership that begins or is renewed


@dataclass(slots=True)
class ChangePlan:
    upsert: list[tuple[int, float | None]] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    exclude: list[int] = field(default_factory=list)
    unexclude: list[int] = field(default_factory=list)
    events: list[HistoryEvent] = field(default_factory=list)


def plan_change(
    change: UserChange,
    expiries: Sequence[float | None],
    segments: Mapping[str, SegmentRef],
    current: Mapping[int, float | None],
    excluded: frozenset[int],
    now: float,
) -> ChangePlan:
    """Decide the writes and the facts for ``change``.

    ``current`` maps the user's explicit memberships to their expiry (None: never),
    expired ones included: a membership found expired here ends at its expiry time,
    exactly as the expiry sweeper would have logged it.  Every change of explicit state
    is a fact, whether or not a reader can see it (a percentage rule may include the
    user anyway): what a reader saw is derived from the facts and the rules' history
    when a report is made.  Re-adding a live membership with the same expiry, and
    removing a segment the user is not in (without a rule to exclude them from),
    change nothing and log nothing.
    """
    plan = ChangePlan()
    events = plan.events

    def ended(seg: SegmentRef) -> bool:
        """Log the end of an expired membership; True if it had ended."""
        expiry = current[seg.id]
        if expiry is not None and expiry <= now:
            events.append(HistoryEvent(expiry, seg.id, seg.slug, "remove", "expiry"))
            return True
        return False

    for item, expiry in zip(change.add, expiries, strict=True):
        seg = segments[item.slug]
        if seg.id not in current or ended(seg):
            events.append(HistoryEvent(now, seg.id, seg.slug, "add", "api", MEMBER, expiry))
        elif current[seg.id] != expiry:
            events.append(HistoryEvent(now, seg.id, seg.slug, "add", RENEW, MEMBER, expiry))
        plan.upsert.append((seg.id, expiry))
        if seg.id in excluded:
            plan.unexclude.append(seg.id)
            events.append(HistoryEvent(now, seg.id, seg.slug, "add", "api", EXCLUSION))

    for slug in change.remove:
        seg = segments[slug]
        if seg.id in current:
            plan.delete.append(seg.id)
            if not ended(seg):
                events.append(HistoryEvent(now, seg.id, seg.slug, "remove", "api"))
        if seg.auto_bp is not None and seg.id not in excluded:
            plan.exclude.append(seg.id)
            events.append(HistoryEvent(now, seg.id, seg.slug, "remove", "api", EXCLUSION))
    return plan
