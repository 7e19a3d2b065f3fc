"""The Kafka message schema: a snapshot split into parts decodes back into one list."""

from __future__ import annotations

import pytest

from service.ingest.messages import InvalidMessage, decode, snapshot


def test_snapshot_parts_cover_the_list_once() -> None:
    ids = list(range(1, 1002))
    messages = snapshot(7, "LOYAL", ids, 4, "b1")
    changes = [decode(key, value, max_ids=10_000) for key, value in messages]
    assert [(c.part, c.parts, c.batch_id) for c in changes] == [(i, 4, "b1") for i in (1, 2, 3, 4)]
    assert [cid for c in changes for cid in c.add] == ids
    assert {key for key, _ in messages} == {b"7:LOYAL"}


def test_key_must_match_the_body() -> None:
    ((_, value),) = snapshot(7, "LOYAL", [1], 1, "b1")
    with pytest.raises(InvalidMessage, match="does not match"):
        decode(b"8:LOYAL", value, max_ids=10)
