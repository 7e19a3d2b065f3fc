from service.domain.changes import SegmentRef, plan_change
from service.domain.model import AddItem, UserChange

A = SegmentRef(1, "A", None)
B = SegmentRef(2, "B", None)
ALL = SegmentRef(3, "ALL", 10_000)
SEGS = {s.slug: s for s in (A, B, ALL)}
NOW = 1000.0


def change(add: list[str] = [], remove: list[str] = []) -> UserChange:  # noqa: B006
    return UserChange(7, tuple(AddItem(s) for s in add), tuple(remove))


def ops(plan) -> list[tuple[str, str, str, float]]:  # type: ignore[no-untyped-def]
    return [(e.slug, e.operation, e.cause, e.occurred_at) for e in plan.events]


def test_new_membership_logs_add() -> None:
    plan = plan_change(change(["A"]), [None], SEGS, {}, frozenset(), NOW)
    assert plan.upsert == [(1, None)]
    assert ops(plan) == [("A", "add", "api", NOW)]


def test_re_adding_live_membership_only_moves_expiry() -> None:
    plan = plan_change(change(["A"]), [2000.0], SEGS, {1: None}, frozenset(), NOW)
    assert plan.upsert == [(1, 2000.0)]
    assert plan.events == []


def test_re_adding_expired_membership_logs_expiry_then_add() -> None:
    plan = plan_change(change(["A"]), [None], SEGS, {1: 900.0}, frozenset(), NOW)
    assert ops(plan) == [("A", "remove", "expiry", 900.0), ("A", "add", "api", NOW)]


def test_removing_absent_membership_logs_nothing() -> None:
    plan = plan_change(change(remove=["B"]), [], SEGS, {}, frozenset(), NOW)
    assert plan.delete == [] and plan.events == []


def test_removing_from_percentage_segment_excludes_user() -> None:
    plan = plan_change(change(remove=["ALL"]), [], SEGS, {}, frozenset(), NOW)
    assert plan.exclude == [3]
    assert ops(plan) == [("ALL", "remove", "api", NOW)]


def test_adding_back_to_percentage_segment_lifts_exclusion() -> None:
    plan = plan_change(change(["ALL"]), [None], SEGS, {}, frozenset({3}), NOW)
    assert plan.unexclude == [3]
    assert ops(plan) == [("ALL", "add", "api", NOW)]
