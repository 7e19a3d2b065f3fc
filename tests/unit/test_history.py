"""Deriving what readers saw from facts and rules (service/domain/history.py).

The property test replays random histories of one (user, segment) pair through the
real planner (``plan_change``) and compares the derived rows, for random periods, with
what a reader would have seen at every instant (a brute-force model of
``rules.visible_slugs``).
"""

from __future__ import annotations

import random

import mmh3
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.changes import SegmentRef, plan_change
from service.domain.history import (
    EMPTY,
    NEVER_US,
    Fact,
    Timeline,
    buckets,
    initial_state,
    rule_classes,
    transitions,
)
from service.domain.model import AddItem, UserChange
from service.domain.rules import bucket

SID, UID = 7, 42


def test_buckets_match_the_documented_hash() -> None:
    rng = random.Random(1)
    ids = [rng.randrange(1, 2**63) for _ in range(500)] + [1, 9, 10, 2**63 - 1]
    for sid in (1, 12, 123456):
        assert buckets(sid, ids) == [bucket(sid, u) for u in ids]
        assert buckets(sid, ids[:3]) == [
            mmh3.hash(f"{sid}:{u}", 0, signed=False) % 10_000 for u in ids[:3]
        ]


def timeline(*changes: tuple[int, str, int | None]) -> Timeline:
    t = Timeline(SID, "S")
    for at, operation, bp in changes:
        t.add(at, operation, bp)
    return t


def test_expiry_of_an_explicit_membership_the_rule_covers_is_not_a_change() -> None:
    """Defect 1: an explicit add with a TTL, the rule including the user all along."""
    rule = timeline((10, "created", 10_000))
    facts = [Fact(20, True, True, "api", 30), Fact(30, True, False, "expiry", NEVER_US)]
    rows = transitions(rule, 1234, facts, EMPTY, 0, 100, 100)
    assert rows == [(10, True)]


def test_rule_changes_are_changes() -> None:
    """Defect 2: created, lowered, raised, dropped."""
    rule = timeline(
        (10, "created", 5000), (20, "rule_changed", 1000), (30, "rule_changed", 9000),
        (40, "rule_changed", None),
    )  # fmt: skip
    assert transitions(rule, 3000, [], EMPTY, 0, 100, 100) == [
        (10, True), (20, False), (30, True), (40, False),
    ]  # fmt: skip
    # Explicitly added while the rule included them, kept when the rule was dropped.
    facts = [Fact(15, True, True, "api", NEVER_US)]
    assert transitions(rule, 3000, facts, EMPTY, 0, 100, 100) == [(10, True)]


def test_baseline_reports_nothing_at_its_instant() -> None:
    rule = timeline((10, "baseline", 10_000), (20, "rule_changed", None))
    assert transitions(rule, 5, [], EMPTY, 0, 100, 100) == [(20, False)]


def test_state_before_a_period_is_read_backwards() -> None:
    begin = Fact(50, True, True, "api", NEVER_US)
    renew = Fact(50, True, True, "renew", 90)
    end = Fact(50, True, False, "api", NEVER_US)
    assert initial_state([begin], None, False) == (False, NEVER_US, False)
    assert initial_state([renew], 90, False) == (True, NEVER_US, False)
    assert initial_state([end], None, False) == (True, NEVER_US, False)
    assert initial_state([], 70, False) == (True, 70, False)
    assert initial_state([Fact(50, False, False, "api", NEVER_US)], None, True).excluded is False
    assert initial_state([Fact(50, False, True, "api", NEVER_US)], None, False).excluded is True


# -- the property --------------------------------------------------------------------------

BPS = [None, 0, 2500, 5000, 7500, 10_000]
op_st = st.one_of(
    st.tuples(st.just("rule"), st.sampled_from(BPS)),
    st.tuples(st.just("add"), st.one_of(st.none(), st.integers(1, 35))),
    st.tuples(st.just("remove"), st.none()),
    st.tuples(st.just("sweep"), st.none()),
    st.tuples(st.just("delete"), st.none()),
)


class Model:
    """One pair, written through the real planner; and what a reader saw, instant by
    instant."""

    def __init__(self, bp: int | None) -> None:
        self.live, self.bp = True, bp
        self.member: int | None = None  # expiry (NEVER_US: none) or None
        self.excluded = False
        self.facts: list[Fact] = []
        self.timeline = timeline((0, "created", bp))
        self.states: list[tuple[int, bool, int | None, int | None, bool]] = [
            (0, True, bp, None, False)
        ]

    def apply(self, at: int, op: str, arg: int | None) -> None:
        if not self.live:
            return
        if op == "rule":
            if arg != self.bp:
                self.bp = arg
                self.timeline.add(at, "rule_changed", arg)
        elif op in ("add", "remove"):
            seg = SegmentRef(SID, "S", self.bp)
            expiry = None if arg is None else at + arg
            change = UserChange(UID, (AddItem("S", expiry),) if op == "add" else (), ())
            if op == "remove":
                change = UserChange(UID, (), ("S",))
            current = {} if self.member is None else {SID: _seconds(self.member)}
            excluded = frozenset({SID}) if self.excluded else frozenset()
            plan = plan_change(
                change, [expiry] if op == "add" else [], {"S": seg}, current, excluded, at
            )
            for e in plan.events:
                exp = NEVER_US if e.expires_at is None else int(e.expires_at)
                self.facts.append(
                    Fact(int(e.occurred_at), e.kind == "member", e.operation == "add", e.cause, exp)
                )
            if plan.upsert:
                self.member = NEVER_US if expiry is None else expiry
            if plan.delete:
                self.member = None
            self.excluded = (self.excluded or bool(plan.exclude)) and not plan.unexclude
        elif op == "sweep":
            if self.member is not None and self.member <= at:
                self.facts.append(Fact(self.member, True, False, "expiry", NEVER_US))
                self.member = None
        elif op == "delete":
            if self.member is not None:
                cause = "expiry" if self.member <= at else "segment_deleted"
                self.facts.append(Fact(min(self.member, at), True, False, cause, NEVER_US))
            if self.excluded:
                self.facts.append(Fact(at, False, True, "segment_deleted", NEVER_US))
            self.live, self.member, self.excluded = False, None, False
            self.timeline.add(at, "deleted", None)
        self.states.append((at, self.live, self.bp, self.member, self.excluded))

    def visible(self, t: int, b: int) -> bool:
        state = next(s for s in reversed(self.states) if s[0] <= t)
        _, live, bp, member, excluded = state
        by_rule = bp is not None and b < bp and not excluded
        return live and ((member is not None and member > t) or by_rule)


def _seconds(expiry: int) -> float | None:
    return None if expiry == NEVER_US else float(expiry)


def check(
    bp: int | None,
    ops: list[tuple[str, int | None]],
    b: int,
    window: tuple[int, int],
    tail: int,
) -> None:
    model = Model(bp)
    for i, (op, arg) in enumerate(ops):
        model.apply(10 * (i + 1), op, arg)
    now = 10 * len(ops) + tail  # the report's time: expiries may lie beyond the last event
    start, end = sorted(window)
    end += 1
    facts = sorted((f for f in model.facts if f.at >= start), key=lambda f: f.at)
    state = initial_state(facts, model.member, model.excluded)
    rows = transitions(model.timeline, b, facts, state, start, end, now)
    # Rows alternate, start from the state before the period, and replay every instant.
    before = model.visible(start - 1, b) if start > 0 else False
    seen = before
    for _, add in rows:
        assert add != seen, rows
        seen = add
    for t in range(start, min(end, now + 1)):
        replayed = [add for at, add in rows if at <= t]
        assert (replayed[-1] if replayed else before) == model.visible(t, b), (t, rows)
    assert all(start <= at < end and at <= now for at, _ in rows)
    # Without explicit state, the rule alone: the same rows by bucket class.
    if not model.facts:
        assert rule_classes(model.timeline, start, end, now).of(b) == rows


@settings(max_examples=500, deadline=None, database=None)
@given(
    bp=st.sampled_from(BPS),
    ops=st.lists(op_st, max_size=12),
    b=st.integers(0, 9999),
    window=st.tuples(st.integers(0, 200), st.integers(0, 200)),
    tail=st.integers(0, 40),
)
def test_derived_rows_replay_what_a_reader_saw(
    bp: int | None,
    ops: list[tuple[str, int | None]],
    b: int,
    window: tuple[int, int],
    tail: int,
) -> None:
    check(bp, ops, b, window, tail)


def test_derived_rows_replay_what_a_reader_saw_many_random_histories() -> None:
    """The same property over 20,000 seeded random histories: hypothesis favours
    small cases, and an expiry between two events needs a few steps in a row."""
    rng = random.Random(14)
    kinds = ["rule", "add", "add", "remove", "sweep", "delete"]
    for _ in range(20_000):
        ops: list[tuple[str, int | None]] = []
        for _ in range(rng.randrange(13)):
            kind = rng.choice(kinds) if rng.random() > 0.05 else "delete"
            if kind == "rule":
                ops.append((kind, rng.choice(BPS)))
            elif kind == "add":
                ops.append((kind, rng.choice([None, rng.randrange(1, 36)])))
            else:
                ops.append((kind, None))
        window = (rng.randrange(201), rng.randrange(201))
        check(rng.choice(BPS), ops, rng.randrange(10_000), window, rng.randrange(41))
