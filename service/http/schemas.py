"""Request and response bodies.  The same Structs validate input and generate the
OpenAPI document, so the two cannot drift apart."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from service.domain.rules import (
    MAX_AUDIENCE_IDS,
    MAX_LIST_ITEMS,
    SLUG_PATTERN,
    TTL_MAX_S,
    TTL_MIN_S,
    USER_ID_MAX,
    USER_ID_MIN,
)

# Free text is stored in PostgreSQL, which cannot hold U+0000.
Text = Annotated[str, Meta(max_length=1000, pattern="^[^\\x00]*$")]

Slug = Annotated[
    str,
    Meta(
        pattern=SLUG_PATTERN,
        description="Case-sensitive segment name",
        examples=["VOICE_MESSAGES"],
    ),
]
UserId = Annotated[int, Meta(ge=USER_ID_MIN, le=USER_ID_MAX, examples=[1000])]


class SegmentCreate(Struct, forbid_unknown_fields=True):
    slug: Slug
    auto_percent: (
        Annotated[
            float,
            Meta(
                ge=0,
                le=100,
                description="Share of all users included automatically (two decimals)",
            ),
        ]
        | None
    ) = None
    description: Text = ""


class SegmentUpdate(Struct, forbid_unknown_fields=True):
    """Fields left out stay as they are; ``auto_percent: null`` drops the rule."""

    auto_percent: Annotated[float, Meta(ge=0, le=100)] | msgspec.UnsetType | None = msgspec.UNSET
    description: Text | msgspec.UnsetType = msgspec.UNSET


class SegmentOut(Struct):
    slug: str
    description: str
    auto_percent: float | None
    created_at: dt.datetime


class SegmentList(Struct):
    segments: list[SegmentOut]


class AddItemIn(Struct, forbid_unknown_fields=True):
    """One item of ``add`` with an expiry (the domain's ``model.AddItem`` once resolved)."""

    slug: Slug
    ttl_seconds: Annotated[int, Meta(ge=TTL_MIN_S, le=TTL_MAX_S)] | None = None
    expires_at: Annotated[dt.datetime, Meta(tz=True)] | None = None


class UserSegmentsUpdate(Struct, forbid_unknown_fields=True):
    add: Annotated[list[Slug | AddItemIn], Meta(max_length=MAX_LIST_ITEMS)] = []
    remove: Annotated[list[Slug], Meta(max_length=MAX_LIST_ITEMS)] = []


class UserSegments(Struct):
    user_id: int
    segments: list[str]


class RuleOut(Struct):
    auto_percent: float
    # The user's bucket: the rule includes them when bucket < auto_percent x 100.
    bucket: Annotated[int, Meta(ge=0, le=9999)]


class SegmentExplanation(Struct, omit_defaults=True):
    slug: str
    included: bool
    source: Literal["explicit", "rule", "explicit+rule", "excluded"]
    # The explicit membership's expiry, when it has one.
    expires_at: dt.datetime | msgspec.UnsetType = msgspec.UNSET
    # The segment's percentage rule, when it has one, and the user's bucket.
    rule: RuleOut | msgspec.UnsetType = msgspec.UNSET
    # When what a reader sees last changed (from history).
    since: dt.datetime | msgspec.UnsetType = msgspec.UNSET


class UserExplanation(Struct):
    user_id: int
    segments: list[SegmentExplanation]


class ReportRequest(Struct, forbid_unknown_fields=True):
    period: Annotated[str, Meta(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$", examples=["2026-11"])]
    user_id: UserId | None = None


class ReportLink(Struct):
    url: str
    expires_at: dt.datetime


CustomerId = Annotated[int, Meta(ge=USER_ID_MIN, le=USER_ID_MAX)]


class CustomersReplace(Struct, forbid_unknown_fields=True):
    customer_ids: Annotated[list[CustomerId], Meta(max_length=MAX_AUDIENCE_IDS)]


class CustomersPatch(Struct, forbid_unknown_fields=True):
    add: Annotated[list[CustomerId], Meta(max_length=MAX_AUDIENCE_IDS)] = []
    remove: Annotated[list[CustomerId], Meta(max_length=MAX_AUDIENCE_IDS)] = []


class AudienceOut(Struct):
    merchant_id: int
    segment_type: str
    customers: int
    version: int
    updated_at: dt.datetime


class SyncRequest(Struct, forbid_unknown_fields=True):
    promo_id: Slug
    end_date: dt.date


class SyncOut(Struct):
    promo_id: str
    synced: int
    skipped_over_threshold: int
    # None when nobody passed the threshold: nothing was created in CP.
    cp_segment_id: str | None


class PromoOut(Struct):
    promo_id: str
    merchant_id: int
    segment_type: str
    end_date: dt.date
    state: Literal["in_progress", "synced", "failed", "cancelled"]
    synced: int
    skipped_over_threshold: int
    cp_segment_id: str | None
    attempts: int
    last_error: str | None
    updated_at: dt.datetime


class SyncCount(Struct):
    customer_id: int
    active_synced_segments: int


class BatchRead(Struct, forbid_unknown_fields=True):
    user_ids: Annotated[list[UserId], Meta(max_length=MAX_LIST_ITEMS)]


class BatchSegments(Struct):
    users: dict[str, list[str]]


class ErrorDetail(Struct):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorBody(Struct):
    error: ErrorDetail


class Health(Struct):
    status: str
    checks: dict[str, Any] = {}
