"""The id range, the slug shape and the list limits have one home (service/domain/rules.py);
the messages clients read stay as they were."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.domain import rules
from service.domain.audiences import audience_key, check_ids
from service.domain.errors import InvalidRequest
from service.domain.promos.model import check_promo_id
from service.http import schemas
from service.http.handlers import parse_id
from service.http.openapi import build_openapi
from service.settings import Settings

BIG = 2**63


@pytest.mark.parametrize(
    ("call", "message", "details"),
    [
        (
            lambda: parse_id(str(BIG), "merchant_id"),
            "merchant_id must be an integer in 1..9223372036854775807",
            {"merchant_id": str(BIG)},
        ),
        (
            lambda: parse_id("0"),
            "user_id must be an integer in 1..9223372036854775807",
            {"user_id": "0"},
        ),
        (
            lambda: rules.validate_change(0, [], [], max_items=10),
            "user_id must be an integer in 1..9223372036854775807",
            {"user_id": 0},
        ),
        (
            lambda: audience_key(BIG, "T"),
            "merchant_id must be an integer in 1..2^63-1",
            {"merchant_id": BIG},
        ),
        (
            lambda: audience_key(1, "-T"),
            "segment_type must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}",
            {"segment_type": "-T"},
        ),
        (
            lambda: check_promo_id("P\n"),
            "promo_id must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}",
            {"promo_id": "P\n"},
        ),
        (
            lambda: check_ids([1, 0], "customer_ids", 10),
            "customer_ids: customer ids are integers in 1..2^63-1",
            {"customer_id": 0},
        ),
    ],
)
def test_messages_are_as_clients_have_read_them(
    call: Callable[[], Any], message: str, details: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        call()
    assert refused.value.message == message
    assert refused.value.details == details


def test_valid_ids_and_slugs_pass() -> None:
    assert rules.check_id(rules.USER_ID_MAX, "user_id") == 2**63 - 1
    assert parse_id("1", "customer_id") == 1
    assert rules.check_slug("A.b:c-1_", "slug") == "A.b:c-1_"


def test_the_list_limit_is_the_rules_everywhere() -> None:
    assert Settings().max_list_length == rules.MAX_LIST_ITEMS == 1000
    components = build_openapi()["components"]["schemas"]
    assert components["BatchRead"]["properties"]["user_ids"]["maxItems"] == rules.MAX_LIST_ITEMS
    customers = components["CustomersReplace"]["properties"]["customer_ids"]
    assert customers["maxItems"] == rules.MAX_AUDIENCE_IDS == 1_000_000
    add = components["UserSegmentsUpdate"]["properties"]["add"]
    assert add["maxItems"] == rules.MAX_LIST_ITEMS
    assert not hasattr(schemas, "MAX_ITEMS")
