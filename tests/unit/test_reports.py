import base64
import datetime as dt
import string
import time

import pytest

from service.domain.errors import InvalidRequest
from service.domain.reports import (
    HistoryReports,
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
    assert verify_link(b"k", sign_link(b"k", "0001-01", None, 5), now=0) == ("0001-01", None)
    with pytest.raises(LinkExpired):
        verify_link(b"k", token, now=1000)
    with pytest.raises(LinkInvalid):
        verify_link(b"other", token, now=0)
    # Any change to any character is detected.
    for i in range(len(token)):
        flipped = "A" if token[i] != "A" else "B"
        altered = token[:i] + flipped + token[i + 1 :]
        if altered != token:
            with pytest.raises(LinkInvalid):
                verify_link(b"k", altered, now=0)
    for junk in ("", ".", "../../etc/passwd", "a.b", token[:-1], token + "AA", "é" * 70):
        with pytest.raises(LinkInvalid):
            verify_link(b"k", junk, now=0)


def test_link_shows_nothing_of_its_query() -> None:
    """The token is opaque: no user id or period in it, and two links for the same
    query differ (a fresh nonce each)."""
    uid = 123456789
    tokens = {sign_link(b"k", "2026-11", uid, 1000) for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert len(token) == 70
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert uid.to_bytes(8, "big") not in raw and str(uid).encode() not in raw
        assert b"2026" not in raw and (2026).to_bytes(2, "big") not in raw
        assert set(token) <= set(string.ascii_letters + string.digits + "-_")


async def test_a_paced_report_streams_at_its_rate_and_all_of_it() -> None:
    rows = [f"{u};A;add;2026-11-01 00:00:00\n".encode() for u in range(1, 2001)]

    class Source:
        async def history_csv(self, start, end, user_id, formula_starts, sink, labels):  # type: ignore[no-untyped-def]
            for i in range(0, len(rows), 100):
                await sink(b"".join(rows[i : i + 100]))

    got: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        got.append(chunk)

    start, end = parse_period("2026-11", NOW)
    for rate, at_least in ((10_000.0, 0.18), (0.0, 0.0)):
        got.clear()
        reports = HistoryReports(Source(), b"k" * 32, 60, max_rows_per_s=rate)  # type: ignore[arg-type]
        t = time.monotonic()
        await reports.write_csv(start, end, None, sink)
        elapsed = time.monotonic() - t
        assert b"".join(got[1:]) == b"".join(rows)  # every row, after the header
        assert elapsed >= at_least
        if not rate:
            assert elapsed < 0.1
