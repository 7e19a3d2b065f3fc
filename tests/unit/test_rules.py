import pytest

from service.domain import rules
from service.domain.errors import InvalidRequest
from service.domain.model import AddItem, Registry, RegistryEntry


@pytest.mark.parametrize(
    "slug", ["A", "VOICE_MESSAGES", "discount.30", "a:b-c_d", "9lives", "x" * 128]
)
def test_valid_slugs(slug: str) -> None:
    assert rules.is_valid_slug(slug)


@pytest.mark.parametrize("slug", ["", "_lead", "-lead", "has space", "x" * 129, "ü", "a/b", "a\n"])
def test_invalid_slugs(slug: str) -> None:
    assert not rules.is_valid_slug(slug)


@pytest.mark.parametrize(("uid", "ok"), [(0, False), (1, True), (2**63 - 1, True), (2**63, False)])
def test_user_id_range(uid: int, ok: bool) -> None:
    assert rules.is_valid_user_id(uid) is ok


def test_change_rejects_slug_in_both_lists() -> None:
    with pytest.raises(InvalidRequest) as err:
        rules.validate_change(1, [AddItem("A"), AddItem("B")], ["B"], max_items=10)
    assert err.value.details == {"slugs": ["B"]}


def test_change_rejects_duplicates_and_bad_slugs() -> None:
    with pytest.raises(InvalidRequest) as err:
        rules.validate_change(1, [AddItem("A"), AddItem("A")], [], max_items=10)
    assert err.value.details == {"slugs": ["A"]}
    with pytest.raises(InvalidRequest):
        rules.validate_change(1, [AddItem("bad slug")], [], max_items=10)


def test_change_rejects_too_many_items() -> None:
    with pytest.raises(InvalidRequest):
        rules.validate_change(1, [AddItem(f"S{i}") for i in range(11)], [], max_items=10)


def test_expiry_resolution() -> None:
    assert rules.resolve_expiry(100.0, 60, None, "A") == 160.0
    assert rules.resolve_expiry(100.0, None, 500.0, "A") == 500.0
    assert rules.resolve_expiry(100.0, None, None, "A") is None
    for ttl, at in [(60, 500.0), (0, None), (rules.TTL_MAX_S + 1, None), (None, 100.0)]:
        with pytest.raises(InvalidRequest):
            rules.resolve_expiry(100.0, ttl, at, "A")


def test_percent_to_basis_points() -> None:
    assert rules.percent_to_bp(0) == 0
    assert rules.percent_to_bp(12.34) == 1234
    assert rules.percent_to_bp(100) == 10000
    for bad in (-0.01, 100.01, 12.345):
        with pytest.raises(InvalidRequest):
            rules.percent_to_bp(bad)


def test_bucket_is_reproducible_murmur3() -> None:
    # Pinned values: another service reproducing the documented function must get these.
    import mmh3

    assert rules.bucket(7, 1000) == mmh3.hash("7:1000", 0, signed=False) % 10_000
    assert 0 <= rules.bucket(1, 2**63 - 1) < 10_000


def test_visible_slugs_drops_deleted_and_sorts() -> None:
    reg = Registry(5, {1: RegistryEntry("B"), 2: RegistryEntry("A")})
    assert rules.visible_slugs(reg, 10, [1, 2, 3]) == ["A", "B"]


def test_visible_slugs_percentage_rule_and_exclusion() -> None:
    reg = Registry(1, {1: RegistryEntry("ALL", 10_000), 2: RegistryEntry("NONE", 0)})
    assert rules.visible_slugs(reg, 10, []) == ["ALL"]
    assert rules.visible_slugs(reg, 10, [], excluded_ids=[1]) == []


def test_inlined_rule_in_visible_slugs_equals_bucket() -> None:
    reg = Registry(1, {7: RegistryEntry("P", 3333), 8: RegistryEntry("Q", 5000)})
    for uid in range(1, 3000):
        expected = [
            s for sid, s in ((7, "P"), (8, "Q")) if rules.bucket(sid, uid) < {7: 3333, 8: 5000}[sid]
        ]
        assert rules.visible_slugs(reg, uid, []) == expected


def test_remembered_rule_results_equal_the_rule_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rules, "AUTO_MEMO_USERS", 100)
    shares = {7: 3333, 8: 5000, 9: 100}
    reg = Registry(1, {sid: RegistryEntry(f"S{sid}", bp) for sid, bp in shares.items()})
    for _ in range(2):  # the second pass answers from what the first remembered
        for uid in range(1, 1000):
            excluded = [8] if uid % 3 == 0 else []
            expected = [
                f"S{sid}"
                for sid, bp in shares.items()
                if sid not in excluded and rules.bucket(sid, uid) < bp
            ]
            assert rules.visible_slugs(reg, uid, [], excluded) == expected
            assert len(reg.auto_memo) <= 100
    # A new registry (a share changed) remembers nothing of the old one's answers.
    raised = Registry(2, {sid: RegistryEntry(f"S{sid}", 10_000) for sid in shares})
    assert raised.auto_memo == {}
    assert rules.visible_slugs(raised, 999, []) == ["S7", "S8", "S9"]
