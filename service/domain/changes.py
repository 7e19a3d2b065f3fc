"""Planning a change of one user's memberships: what to write and which history to log.

Pure functions: the store reads the user's current rows under a lock, asks
``plan_change`` what to do, and executes the plan in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.domain.model import UserChange
from service.domain.rules import bucket


@dataclass(frozen=True, slots=True)
class SegmentRef:
    id: int
    slug: str
    auto_bp: int | None


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    occurred_at: float
    segment_id: int
    slug: str
    operation: str  # "add" | "remove"
    cause: str  # "api", "expiry", "segment_deleted", ...


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
    """Decide the writes and history for ``change``.

    ``current`` maps the user's explicit memberships to their expiry (None: never),
    expired ones included: a membership found expired here ends in history at its
    expiry time, exactly as the expiry sweeper would have logged it.  History records
    only changes a reader could see: re-adding a live membership just moves its
    expiry, and removing a segment the user is not in logs nothing.
    """
    plan = ChangePlan()

    def live(seg: SegmentRef) -> bool:
        if seg.id not in current:
            return False
        expiry = current[seg.id]
        if expiry is not None and expiry <= now:
            plan.events.append(HistoryEvent(expiry, seg.id, seg.slug, "remove", "expiry"))
            return False
        return True

    def by_rule(seg: SegmentRef) -> bool:
        return (
            seg.auto_bp is not None
            and seg.id not in excluded
            and bucket(seg.id, change.user_id) < seg.auto_bp
        )

    for item, expiry in zip(change.add, expiries, strict=True):
        seg = segments[item.slug]
        visible = live(seg) or by_rule(seg)
        plan.upsert.append((seg.id, expiry))
        if seg.id in excluded:
            plan.unexclude.append(seg.id)
        if not visible:
            plan.events.append(HistoryEvent(now, seg.id, seg.slug, "add", "api"))

    for slug in change.remove:
        seg = segments[slug]
        explicit = seg.id in current
        visible = live(seg) or by_rule(seg)
        if explicit:
            plan.delete.append(seg.id)
        if seg.auto_bp is not None and seg.id not in excluded:
            plan.exclude.append(seg.id)
        if visible:
            plan.events.append(HistoryEvent(now, seg.id, seg.slug, "remove", "api"))
    return plan
