"""The Kafka message schema (DESIGN.md §6) and its decoding into domain changes."""

from __future__ import annotations

from typing import Literal

import msgspec
import orjson

from service.domain.audiences import AudienceChange, AudienceKey, check_change
from service.domain.errors import DomainError


class AudienceMessage(msgspec.Struct):
    """Value of a ``merchant-segments`` message.  Unknown fields are ignored, so data
    engineering can add fields without breaking this consumer."""

    merchant_id: int
    segment_type: str
    op: Literal["replace", "add", "remove"]
    customer_ids: list[int]
    batch_id: str
    part: int | None = None
    parts: int | None = None


class InvalidMessage(Exception):
    """A message that can never be applied; it goes to the dead-letter topic."""


_decoder = msgspec.json.Decoder(AudienceMessage)

# What a reason quotes of the message: a few items, each clipped.
_QUOTE_ITEMS = 10
_QUOTE_CHARS = 100


def decode(key: bytes | None, value: bytes | None, max_ids: int) -> AudienceChange:
    """The change a message asks for, validated by the same rules as the API's.

    Raises InvalidMessage, and nothing else, for any key and value (fuzzed in
    tests/unit/test_messages_fuzz.py); the reason says what is wrong.  ``part`` and
    ``parts`` are taken as given: both absent (or null) is a whole message, both present
    must satisfy 1 <= part <= parts; anything else is invalid.
    """
    if value is None:
        raise InvalidMessage("empty message value")
    try:
        msg = _decoder.decode(value)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        # RecursionError: JSON nested deeper than msgspec follows (in an ignored field).
        raise InvalidMessage(f"undecodable: {_clip(str(exc), 500)}") from None
    if msg.part is None and msg.parts is None:
        part = parts = 1
    elif msg.part is not None and msg.parts is not None:
        part, parts = msg.part, msg.parts  # ranges checked by check_change
    else:
        raise InvalidMessage("part and parts go together: both (1 <= part <= parts) or neither")
    change = AudienceChange(
        AudienceKey(msg.merchant_id, msg.segment_type),
        msg.op,
        add=msg.customer_ids if msg.op != "remove" else (),
        remove=msg.customer_ids if msg.op == "remove" else (),
        source="kafka",
        batch_id=msg.batch_id,
        part=part,
        parts=parts,
    )
    try:
        check_change(change, max_ids)
    except DomainError as exc:
        raise InvalidMessage(f"{exc.message} {_quote(exc.details)}") from None
    # Only now are merchant_id and segment_type known to be small and printable.
    expected = f"{msg.merchant_id}:{msg.segment_type}".encode()
    if key is not None and key != expected:
        raise InvalidMessage(f"key {key[:_QUOTE_CHARS]!r} does not match the body ({expected!r})")
    return change


def _clip(text: str, limit: int = _QUOTE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _quotable(value: object) -> object:
    """``value`` cut down to what a reason may quote: JSON-able, bounded, with integers
    beyond 64 bits described rather than written (orjson refuses them, and Python
    refuses to print those over 4,300 digits)."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, dict):
        items = list(value.items())[:_QUOTE_ITEMS]
        return {_clip(str(k)): _quotable(v) for k, v in items}
    if isinstance(value, list | tuple | set | frozenset):
        return [_quotable(v) for v in list(value)[:_QUOTE_ITEMS]]
    return _clip(type(value).__name__)


def _quote(details: object) -> str:
    try:
        return orjson.dumps(_quotable(details)).decode()
    except (TypeError, ValueError):  # cannot happen with _quotable's output: never fatal
        return "{}"


def encode(msg: AudienceMessage) -> tuple[bytes, bytes]:
    """(key, value) as data engineering publishes them."""
    return f"{msg.merchant_id}:{msg.segment_type}".encode(), msgspec.json.encode(msg)


def snapshot(
    merchant_id: int, segment_type: str, customer_ids: list[int], parts: int, batch_id: str
) -> list[tuple[bytes, bytes]]:
    """A `replace` of the whole list split into ``parts`` messages, as (key, value)."""
    size = -(-len(customer_ids) // parts)
    return [
        encode(
            AudienceMessage(
                merchant_id=merchant_id,
                segment_type=segment_type,
                op="replace",
                customer_ids=customer_ids[i * size : (i + 1) * size],
                batch_id=batch_id,
                part=i + 1,
                parts=parts,
            )
        )
        for i in range(parts)
    ]
