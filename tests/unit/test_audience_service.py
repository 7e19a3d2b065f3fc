"""AudienceService on an in-memory store: the rules it enforces before the store sees a
change, log order for snapshots in parts, Kafka offsets, and stale snapshots."""

from __future__ import annotations

import logging

import pytest

from service.domain.audiences import (
    AudienceChange,
    AudienceKey,
    AudienceNotFound,
    AudienceService,
)
from service.domain.errors import InvalidRequest
from tests.fakes import FakeAudienceStore

KEY = AudienceKey(7, "vip")


@pytest.fixture
def store() -> FakeAudienceStore:
    return FakeAudienceStore()


@pytest.fixture
def service(store: FakeAudienceStore) -> AudienceService:
    return AudienceService(store, max_ids=5)


async def test_replace_then_patch_counts_what_changed(
    service: AudienceService, store: FakeAudienceStore
) -> None:
    first = await service.apply(AudienceChange(KEY, "replace", add=[3, 1, 2, 2]))
    assert first is not None and (first.customers, first.version) == (3, 1)
    patched = await service.apply(AudienceChange(KEY, "patch", add=[4, 1], remove=[2, 99]))
    assert patched is not None and (patched.customers, patched.version) == (3, 2)
    assert store.members[KEY] == {1, 3, 4}
    # A patch counts only real changes: 1 was in, 99 was not.
    assert store.history == [("7:vip", "replace", 3, 0, 3), ("7:vip", "patch", 1, 1, 3)]
    info = await service.get(KEY)
    assert (info.customers, info.version) == (3, 2)


@pytest.mark.parametrize(
    "change",
    [
        AudienceChange(KEY, "replace", add=[1, 0]),  # an id out of range
        AudienceChange(KEY, "replace", add=[1, 2, 3, 4, 5, 6]),  # over max_ids
        AudienceChange(KEY, "patch", add=[1], remove=[1]),  # both added and removed
        AudienceChange(AudienceKey(0, "vip"), "add", add=[1]),  # a bad merchant
        AudienceChange(AudienceKey(7, "no spaces"), "add", add=[1]),  # a bad type
        AudienceChange(KEY, "add", add=[1], batch_id="b", part=1, parts=2),  # only replaces split
    ],
)
async def test_invalid_changes_never_reach_the_store(
    service: AudienceService, store: FakeAudienceStore, change: AudienceChange
) -> None:
    with pytest.raises(InvalidRequest):
        await service.apply(change)
    assert store.versions == {} and store.pending == {}


async def test_unknown_audience_is_not_found(service: AudienceService) -> None:
    with pytest.raises(AudienceNotFound) as err:
        await service.get(KEY)
    assert err.value.details == {"audience": "7:vip"}


async def test_a_snapshot_in_parts_applies_when_all_parts_are_in(
    service: AudienceService, store: FakeAudienceStore
) -> None:
    await service.apply(AudienceChange(KEY, "replace", add=[9]))
    part = AudienceChange(KEY, "replace", add=[1, 2], batch_id="b1", part=1, parts=2)
    assert await service.apply(part) is None
    assert store.members[KEY] == {9}  # not yet
    last = AudienceChange(KEY, "replace", add=[2, 3], batch_id="b1", part=2, parts=2)
    assert await service.apply(last) is None
    assert store.members[KEY] == {1, 2, 3}
    assert (await service.get(KEY)).version == 2


async def test_kafka_batches_apply_once_in_log_order(
    service: AudienceService, store: FakeAudienceStore
) -> None:
    batch = [
        (5, AudienceChange(KEY, "replace", add=[1], batch_id="s", part=1, parts=2)),
        (6, AudienceChange(KEY, "add", add=[8])),  # waits behind the snapshot
        (7, None),  # set aside: only moves the offset
    ]
    assert await service.apply_kafka("audiences", 0, batch) == 2
    assert KEY not in store.versions  # nothing applied yet
    assert await service.next_offsets("audiences") == {0: 8}
    assert await service.apply_kafka("audiences", 0, batch[:2]) == 0  # a re-delivery
    rest = [(8, AudienceChange(KEY, "replace", add=[2], batch_id="s", part=2, parts=2))]
    assert await service.apply_kafka("audiences", 0, rest) == 1
    assert store.members[KEY] == {1, 2, 8}  # the snapshot, then the add behind it
    assert [h[1] for h in store.history] == ["replace", "add"]


async def test_stale_snapshots_are_discarded_and_what_waited_applies(
    service: AudienceService, store: FakeAudienceStore, caplog: pytest.LogCaptureFixture
) -> None:
    changes = [
        (0, AudienceChange(KEY, "replace", add=[1], batch_id="old", part=1, parts=3)),
        (1, AudienceChange(KEY, "add", add=[4])),
    ]
    await service.apply_kafka("audiences", 0, changes)
    assert await service.discard_stale_snapshots(60) == []  # not old yet
    store.now += 61
    with caplog.at_level(logging.WARNING, logger="service.domain.audiences"):
        stale = await service.discard_stale_snapshots(60)
    assert [(s.batch_id, s.received, s.parts) for s in stale] == [("old", 1, 3)]
    assert "discarded incomplete snapshot old of 7:vip: 1 of 3 parts arrived" in caplog.text
    assert store.members[KEY] == {4}  # the add that waited, on the list as it was
