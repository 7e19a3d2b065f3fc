"""Where a call goes: the checked ids and quoted path segments of the API's URLs, and the
check that an answer is about what was asked for."""

from __future__ import annotations

from urllib.parse import quote

from user_segments_client.errors import SegmentsError


def checked_id(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _part(value: str, name: str) -> str:
    """One path segment.  "", "." and ".." would name another path once quoted (dot
    segments are resolved in URLs); the service accepts none of them anyway."""
    if value in ("", ".", ".."):
        raise ValueError(f"invalid {name} {value!r}")
    return quote(value, safe="")


def segment_path(slug: str) -> str:
    return f"/v1/segments/{_part(slug, 'slug')}"


def audience_path(merchant_id: int, segment_type: str) -> str:
    mid = checked_id(merchant_id, "merchant_id")
    return f"/v1/merchants/{mid}/segments/{_part(segment_type, 'segment_type')}"


def customers_path(merchant_id: int, segment_type: str) -> str:
    return "/internal" + audience_path(merchant_id, segment_type) + "/customers"


def promo_path(promo_id: str) -> str:
    return f"/v1/promos/{_part(promo_id, 'promo_id')}"


def check_echo(what: str, asked: object, got: object) -> None:
    if asked != got:
        raise SegmentsError(200, "invalid_response", f"asked for {what} {asked!r}, got {got!r}")
