"""The Kafka decoder never raises anything but InvalidMessage, whatever the bytes.

A poison message used to block its partition: an exception other than InvalidMessage
(orjson refusing to write a customer id >= 2^64 into the reason) escaped the
dead-letter path.  Fuzzed over arbitrary bytes, arbitrary JSON and dicts close to the
real schema; and ``part``/``parts`` are validated as given (``0``/``0`` was once read
as a one-part replace).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.audiences import MAX_PARTS, AudienceChange
from service.domain.rules import USER_ID_MAX, USER_ID_MIN
from service.ingest.messages import InvalidMessage, decode

MAX_IDS = 50
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(key: bytes | None, value: bytes | None) -> None:
    """decode() returns a valid change or raises InvalidMessage with a usable reason."""
    try:
        change = decode(key, value, MAX_IDS)
    except InvalidMessage as exc:
        reason = str(exc)
        assert reason
        reason.encode()  # goes into a Kafka header
        return
    assert isinstance(change, AudienceChange)
    assert USER_ID_MIN <= change.key.merchant_id <= USER_ID_MAX
    assert all(USER_ID_MIN <= c <= USER_ID_MAX for c in [*change.add, *change.remove])
    assert len(change.add) + len(change.remove) <= MAX_IDS
    assert 1 <= change.part <= change.parts <= MAX_PARTS
    assert "\x00" not in (change.batch_id or "")
    if key is not None:
        assert key == f"{change.key.merchant_id}:{change.key.segment_type}".encode()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**60, max_value=2**200)
    | st.floats()
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

huge_ints = st.sampled_from([2**63, 2**64, 2**64 + 1, -(2**63) - 1, -(2**64), 10**30, -(10**30)])
any_int = st.integers() | huge_ints | st.integers(min_value=-3, max_value=3)
wrong = st.none() | st.booleans() | st.floats() | st.text(max_size=5) | st.lists(st.integers())
huge_text = st.integers(min_value=1, max_value=300_000).map(lambda n: "x" * n)
slug_like = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,5}", fullmatch=True)

ID = st.integers(min_value=USER_ID_MIN, max_value=USER_ID_MAX)
VALID = {
    "merchant_id": ID,
    "segment_type": slug_like,
    "op": st.sampled_from(["replace", "add", "remove"]),
    "customer_ids": st.lists(ID, max_size=5),
    "batch_id": st.text(max_size=10),
}
MUTATIONS = {
    "merchant_id": any_int | wrong,
    "segment_type": st.text() | huge_text | wrong,
    "op": st.sampled_from(["patch", "", "ADD"]) | wrong,
    "customer_ids": st.lists(any_int, max_size=MAX_IDS + 5)
    | st.lists(ID | huge_ints, min_size=1, max_size=5)
    | st.lists(any_int | wrong, max_size=5)
    | wrong,
    "batch_id": huge_text | st.just("a\x00b") | wrong,
    "part": any_int | wrong,
    "parts": any_int | wrong,
}


@st.composite
def near_schema(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with a few fields made wrong (or dropped), and maybe more."""
    msg: dict[str, Any] = draw(st.fixed_dictionaries(VALID))
    if draw(st.booleans()):
        msg["parts"] = draw(st.integers(min_value=1, max_value=MAX_PARTS))
        msg["part"] = draw(st.integers(min_value=1, max_value=msg["parts"]))
    for name in draw(st.sets(st.sampled_from(sorted(MUTATIONS)), max_size=3)):
        msg[name] = draw(MUTATIONS[name])
    for name in draw(st.sets(st.sampled_from(sorted(msg)), max_size=1)):
        del msg[name]
    if draw(st.booleans()):
        msg["extra"] = draw(json_values)
    return msg


def _dumps(value: Any, ascii_only: bool) -> bytes:
    # Python's json writes any int and lone surrogates (escaped, or raw as invalid UTF-8).
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


keys = st.none() | st.binary(max_size=20) | st.sampled_from([b"1:A", b"990:P"])


@FUZZ
@given(st.binary(max_size=2000), keys)
def test_any_bytes(value: bytes, key: bytes | None) -> None:
    _check(key, value)


@FUZZ
@given(json_values, st.booleans(), keys)
def test_any_json(value: Any, ascii_only: bool, key: bytes | None) -> None:
    _check(key, _dumps(value, ascii_only))


@FUZZ
@given(near_schema(), st.booleans(), keys)
def test_dicts_close_to_the_schema(
    value: dict[str, Any], ascii_only: bool, key: bytes | None
) -> None:
    _check(key, _dumps(value, ascii_only))
    # With the key its body implies, when that key can be written at all.
    m, t = value.get("merchant_id"), value.get("segment_type")
    if isinstance(m, int) and not isinstance(m, bool) and abs(m) < 2**64 and isinstance(t, str):
        _check(f"{m}:{t}".encode("utf-8", "surrogatepass"), _dumps(value, ascii_only))


def _message(**fields: Any) -> bytes:
    body = {
        "merchant_id": 990,
        "segment_type": "P",
        "op": "replace",
        "customer_ids": [1, 2],
        "batch_id": "p",
        **fields,
    }
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "add", "customer_ids": [2**64]},  # the probe's message
        {"customer_ids": [2**63]},
        {"customer_ids": [-(2**64)]},
        {"merchant_id": 2**64},
        {"merchant_id": -(10**30)},
    ],
)
def test_out_of_range_integers_are_invalid_messages(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(b"990:P", _message(**fields), MAX_IDS)
    str(caught.value).encode()


def test_an_integer_longer_than_python_prints_is_an_invalid_message() -> None:
    value = _message(customer_ids=[7]).replace(b"[7]", b"[" + b"9" * 5000 + b"]")
    with pytest.raises(InvalidMessage):
        decode(b"990:P", value, MAX_IDS)


def test_deeply_nested_json_is_an_invalid_message() -> None:
    # msgspec raises RecursionError, even in a field the schema ignores.
    value = b'{"extra": ' + b"[" * 100_000 + b"]" * 100_000 + b', "merchant_id": 1}'
    with pytest.raises(InvalidMessage, match="undecodable"):
        decode(None, value, MAX_IDS)


@pytest.mark.parametrize(
    ("part", "parts"),
    [
        (0, 0),
        (0, 1),
        (1, 0),
        (2, 1),
        (-1, 3),
        (1, ...),
        (..., 1),
        (0, ...),
        (None, 2),
        (1, MAX_PARTS + 1),
    ],
)
def test_part_and_parts_are_validated_as_given(part: Any, parts: Any) -> None:
    with pytest.raises(InvalidMessage, match="part"):
        decode(b"990:P", _message(part=part, parts=parts), MAX_IDS)


@pytest.mark.parametrize(
    ("part", "parts", "expected"),
    [(..., ..., (1, 1)), (None, None, (1, 1)), (1, 1, (1, 1)), (2, 3, (2, 3)), (3, 3, (3, 3))],
)
def test_whole_messages_and_parts(part: Any, parts: Any, expected: tuple[int, int]) -> None:
    change = decode(b"990:P", _message(part=part, parts=parts), MAX_IDS)
    assert (change.part, change.parts) == expected
    assert change.is_partial == (expected[1] > 1)
