import datetime as dt

import pytest

from service.domain.errors import InvalidRequest
from service.domain.reports import (
    LinkExpired,
    LinkInvalid,
    parse_period,
    sign_link,
    verify_link,
)

NOW = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)


def test_period_bounds() -> None:
    assert parse_period("2026-02", NOW) == (
        dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
    )
    assert parse_period("2025-12", NOW)[1] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_period("2026-11", NOW)[0] == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("bad", ["2023-13", "23-07", "2023-7", "2026-12", "2023-00", "x", ""])
def test_bad_periods(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_period(bad, NOW)


def test_link_round_trip_tamper_and_expiry() -> None:
    token = sign_link(b"k", "2026-11", 7, expires_at=1000)
    assert verify_link(b"k", token, now=999) == ("2026-11", 7)
    with pytest.raises(LinkExpired):
        verify_link(b"k", token, now=1000)
    with pytest.raises(LinkInvalid):
        verify_link(b"other", token, now=0)
    payload, mac = token.split(".")
    forged = sign_link(b"k", "2026-10", None, 1000).split(".")[0] + "." + mac
    with pytest.raises(LinkInvalid):
        verify_link(b"k", forged, now=0)
    for junk in ("", ".", "../../etc/passwd", "a.b", payload):
        with pytest.raises(LinkInvalid):
            verify_link(b"k", junk, now=0)
