"""History reports: periods, signed links and CSV rows.

A report link carries its own query (period, optional user) and expiry, signed with
HMAC-SHA256; the server reads nothing but the database, so no input can make it open
a file, and a link cannot be guessed, altered or used after it expires.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable

import orjson

from service.domain.errors import DomainError, InvalidRequest
from service.domain.ports import HistorySource
from service.domain.rules import is_valid_user_id

_PERIOD = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
CSV_HEADER = ("user_id", "segment", "operation", "timestamp")
# A cell starting with one of these is a formula to a spreadsheet (OWASP CSV
# injection); such cells get a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class LinkInvalid(DomainError):
    code = "invalid_link"


class LinkExpired(DomainError):
    code = "link_expired"


def parse_period(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """``YYYY-MM`` -> [first instant of the month, first instant of the next), UTC."""
    match = _PERIOD.fullmatch(period)
    if match is None:
        raise InvalidRequest(
            "period must be a year and month as YYYY-MM, e.g. 2026-07", {"period": period}
        )
    year, month = int(match[1]), int(match[2])
    if year < 1:
        raise InvalidRequest("period: the year starts at 0001", {"period": period})
    start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    if start > now:
        raise InvalidRequest("period is in the future; it has no history yet", {"period": period})
    end = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.UTC)
    return start, end


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(secret: bytes, period: str, user_id: int | None, expires_at: float) -> str:
    payload = _b64(orjson.dumps({"p": period, "u": user_id, "e": int(expires_at)}))
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def verify_link(secret: bytes, token: str, now: float) -> tuple[str, int | None]:
    """Return (period, user_id) of a valid link; raise LinkInvalid or LinkExpired."""
    payload, _, mac = token.partition(".")
    try:
        expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(_unb64(mac), expected):
            raise ValueError("bad signature")
        claims = orjson.loads(_unb64(payload))
        period, user_id, expires = claims["p"], claims["u"], claims["e"]
    except (ValueError, KeyError, TypeError):
        raise LinkInvalid("this report link is not valid") from None
    if now >= expires:
        raise LinkExpired("this report link has expired; ask for a new one")
    return period, user_id


class HistoryReports:
    """Issues report links and streams the CSV behind them."""

    def __init__(
        self,
        store: HistorySource,
        secret: bytes,
        link_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._secret = secret
        self._ttl = link_ttl_s
        self._clock = clock

    def create_link(self, period: str, user_id: int | None) -> tuple[str, float]:
        now = self._clock()
        parse_period(period, dt.datetime.fromtimestamp(now, dt.UTC))
        if user_id is not None and not is_valid_user_id(user_id):
            raise InvalidRequest("user_id must be an integer in 1..2^63-1", {"user_id": user_id})
        expires_at = now + self._ttl
        return sign_link(self._secret, period, user_id, expires_at), expires_at

    def open_link(self, token: str) -> tuple[dt.datetime, dt.datetime, int | None, str]:
        """Check a link before anything is sent: (start, end, user_id, period)."""
        now = self._clock()
        period, user_id = verify_link(self._secret, token, now)
        start, end = parse_period(period, dt.datetime.fromtimestamp(now, dt.UTC))
        return start, end, user_id, period

    async def write_csv(
        self,
        start: dt.datetime,
        end: dt.datetime,
        user_id: int | None,
        sink: Callable[[bytes], Awaitable[None]],
    ) -> None:
        await sink((";".join(CSV_HEADER) + "\n").encode())
        await self._store.history_csv(start, end, user_id, FORMULA_STARTS, sink)
