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


def decode(key: bytes | None, value: bytes | None, max_ids: int) -> AudienceChange:
    if value is None:
        raise InvalidMessage("empty message value")
    try:
        msg = _decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"undecodable: {exc}") from None
    expected = f"{msg.merchant_id}:{msg.segment_type}".encode()
    if key is not None and key != expected:
        raise InvalidMessage(f"key {key!r} does not match the body ({expected!r})")
    if (msg.part is None) != (msg.parts is None):
        raise InvalidMessage("part and parts go together")
    change = AudienceChange(
        AudienceKey(msg.merchant_id, msg.segment_type),
        msg.op,
        add=msg.customer_ids if msg.op != "remove" else (),
        remove=msg.customer_ids if msg.op == "remove" else (),
        source="kafka",
        batch_id=msg.batch_id,
        part=msg.part or 1,
        parts=msg.parts or 1,
    )
    try:
        return check_change(change, max_ids)
    except DomainError as exc:
        raise InvalidMessage(f"{exc.message} {orjson.dumps(exc.details).decode()}") from None


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
