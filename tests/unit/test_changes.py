from service.domain.changes import SegmentRef, plan_change
from service.domain.model import AddItem, UserChange

A = SegmentRef(1, "A", None)
B = SegmentRef(2, "B", None)
ALL = SegmentRef(3, "ALL", 10_000)
SEGS = {s.slug: s for s in (A, B, ALL)}
NOW = 1000.0


def change(add: list[str] = [], remove: list[str] = []) -> UserChange:  # noqa: B006
    return UserChange(7, tuple(AddItem(s) for s in add), tuple(remove))


def ops(plan) -> list[tuple[str, str, str, str, float]]:  # type: ignore[no-untyped-def]
    return [(e.slug, e.kind, e.operation, e.cause, e.occurred_at) for e in plan.events]


def test_new_membership_logs_its_beginning_with_its_expiry() -> None:
    plan = plan_change(change(["A"]), [2000.0], SEGS, {}, frozenset(), NOW)
    assert plan.upsert == [(1, 2000.0)]
    assert ops(plan) == [("A", "member", "add", "api", NOW)]
    assert plan.events[0].expires_at == 2000.0


def test_re_adding_live_membership_with_the_same_expiry_logs_nothing() -> None:
    plan = plan_change(change(["A"]), [None], SEGS, {1: None}, frozenset(), NOW)
    assert plan.upsert == [(1, None)]
    assert plan.events == []


def test_re_adding_live_membership_with_a_new_expiry_logs_a_renewal() -> None:
    plan = plan_change(change(["A"]), [3000.0], SEGS, {1: 2000.0}, frozenset(), NOW)
    assert ops(plan) == [("A", "member", "add", "renew", NOW)]
    assert plan.events[0].expires_at == 3000.0


def test_re_adding_expired_membership_logs_expiry_then_add() -> None:
    plan = plan_change(change(["A"]), [None], SEGS, {1: 900.0}, frozenset(), NOW)
    assert ops(plan) == [
        ("A", "member", "remove", "expiry", 900.0),
        ("A", "member", "add", "api", NOW),
    ]


def test_removing_expired_membership_logs_its_expiry() -> None:
    plan = plan_change(change(remove=["A"]), [], SEGS, {1: 900.0}, frozenset(), NOW)
    assert plan.delete == [1]
    assert ops(plan) == [("A", "member", "remove", "expiry", 900.0)]


def test_removing_absent_membership_logs_nothing() -> None:
    plan = plan_change(change(remove=["B"]), [], SEGS, {}, frozenset(), NOW)
    assert plan.delete == [] and plan.events == []


def test_removing_from_percentage_segment_excludes_user() -> None:
    plan = plan_change(change(remove=["ALL"]), [], SEGS, {}, frozenset(), NOW)
    assert plan.exclude == [3]
    assert ops(plan) == [("ALL", "exclusion", "remove", "api", NOW)]


def test_explicit_member_of_a_percentage_segment_logs_both_facts_when_removed() -> None:
    """Facts are logged whether or not a reader could see them: the rule includes the
    user anyway, which the report derives."""
    plan = plan_change(change(remove=["ALL"]), [], SEGS, {3: None}, frozenset(), NOW)
    assert ops(plan) == [
        ("ALL", "member", "remove", "api", NOW),
        ("ALL", "exclusion", "remove", "api", NOW),
    ]


def test_adding_back_to_percentage_segment_lifts_exclusion() -> None:
    plan = plan_change(change(["ALL"]), [None], SEGS, {}, frozenset({3}), NOW)
    assert plan.unexclude == [3]
    assert ops(plan) == [
        ("ALL", "member", "add", "api", NOW),
        ("ALL", "exclusion", "add", "api", NOW),
    ]


def test_explicit_add_while_the_rule_includes_the_user_is_still_a_fact() -> None:
    plan = plan_change(change(["ALL"]), [None], SEGS, {}, frozenset(), NOW)
    assert ops(plan) == [("ALL", "member", "add", "api", NOW)]
