"""History reports: periods, signed links and CSV rows; explanations of a user's segments.

A report link carries its own query (period, optional user) and expiry, encrypted and
authenticated with keys derived from the report secret: the link is the credential
(it opens without a token), it cannot be guessed, altered or used after it expires,
and it shows nothing of its query (no user id in the URL).  The server reads nothing
but the database, so no input can make it open a file.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable

from service.domain import history
from service.domain.errors import DomainError, InvalidRequest
from service.domain.pacing import Pacer
from service.domain.ports import HistorySource
from service.domain.rules import ID_RANGE_SHORT, bad_id, is_valid_user_id

_PERIOD = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
CSV_HEADER = ("user_id", "segment", "operation", "timestamp")
# A cell starting with one of these is a formula to a spreadsheet (OWASP CSV
# injection); such cells get a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# The operations' names by language (``?lang=ru`` on a link).
LABELS = {"en": ("add", "remove"), "ru": ("добавление", "удаление")}


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


# A link token: version, nonce, the encrypted claims (year, month, user id or 0, expiry
# in Unix seconds), and a tag over all of it; base64url, 70 characters.
_VERSION = 1
_CLAIMS = struct.Struct(">HBQQ")
_NONCE = 16
_TAG = 16
_TOKEN_BYTES = 1 + _NONCE + _CLAIMS.size + _TAG


def _key(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, b"segments report link: " + purpose, hashlib.sha256).digest()


def _keystream(key: bytes, nonce: bytes, size: int) -> bytes:
    """HMAC-SHA256 in counter mode (a PRF as a stream cipher); a fresh random nonce
    per link, so no two links share a keystream."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hmac.new(key, nonce + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        counter += 1
    return out[:size]


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def sign_link(secret: bytes, period: str, user_id: int | None, expires_at: float) -> str:
    """A link token for ``period`` (``YYYY-MM``) and ``user_id`` until ``expires_at``:
    encrypt-then-MAC, so it is opaque (nothing of the query is readable) and any change
    to it is detected."""
    year, month = int(period[:4]), int(period[5:7])
    claims = _CLAIMS.pack(year, month, user_id or 0, int(expires_at))
    nonce = secrets.token_bytes(_NONCE)
    sealed = _xor(claims, _keystream(_key(secret, b"enc"), nonce, len(claims)))
    body = bytes([_VERSION]) + nonce + sealed
    tag = hmac.new(_key(secret, b"mac"), body, hashlib.sha256).digest()[:_TAG]
    return _b64(body + tag)


def verify_link(secret: bytes, token: str, now: float) -> tuple[str, int | None]:
    """Return (period, user_id) of a valid link; raise LinkInvalid or LinkExpired."""
    try:
        raw = _unb64(token)
    except ValueError:
        raise LinkInvalid("this report link is not valid") from None
    # Canonical form only: the last character's spare bits must not make an altered
    # string decode to the same token.
    if len(raw) != _TOKEN_BYTES or raw[0] != _VERSION or _b64(raw) != token:
        raise LinkInvalid("this report link is not valid")
    body, tag = raw[:-_TAG], raw[-_TAG:]
    expected = hmac.new(_key(secret, b"mac"), body, hashlib.sha256).digest()[:_TAG]
    if not hmac.compare_digest(tag, expected):
        raise LinkInvalid("this report link is not valid")
    nonce, sealed = body[1 : 1 + _NONCE], body[1 + _NONCE :]
    year, month, user_id, expires = _CLAIMS.unpack(
        _xor(sealed, _keystream(_key(secret, b"enc"), nonce, len(sealed)))
    )
    if not (1 <= month <= 12 and (user_id == 0 or is_valid_user_id(user_id))):
        raise LinkInvalid("this report link is not valid")
    if now >= expires:
        raise LinkExpired("this report link has expired; ask for a new one")
    return f"{year:04d}-{month:02d}", user_id or None


class HistoryReports:
    """Issues report links and streams the CSV behind them."""

    def __init__(
        self,
        store: HistorySource,
        secret: bytes,
        link_ttl_s: float,
        clock: Callable[[], float] = time.time,
        max_rows_per_s: float = 0.0,
    ) -> None:
        self._store = store
        self._secret = secret
        self._ttl = link_ttl_s
        self._clock = clock
        self._max_rows_per_s = max_rows_per_s

    def create_link(self, period: str, user_id: int | None) -> tuple[str, float]:
        now = self._clock()
        parse_period(period, dt.datetime.fromtimestamp(now, dt.UTC))
        if user_id is not None and not is_valid_user_id(user_id):
            raise bad_id("user_id", user_id, ID_RANGE_SHORT)
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
        lang: str = "en",
    ) -> None:
        """The header, then every change a reader saw in [start, end), in time order,
        at most ``max_rows_per_s`` rows a second: while the sink waits, PostgreSQL's
        COPY waits too (asyncpg stops reading it), so the pace bounds both."""
        await sink((";".join(CSV_HEADER) + "\n").encode())
        out = sink
        if self._max_rows_per_s > 0:
            pace = Pacer(self._max_rows_per_s)
            pace.start()

            async def paced(chunk: bytes) -> None:
                await sink(chunk)
                await pace(chunk.count(b"\n"))

            out = paced
        await self._store.history_csv(start, end, user_id, FORMULA_STARTS, out, LABELS[lang])

    async def explain(self, user_id: int) -> list[history.Explanation]:
        """Why a user is (or is not) in each live segment that includes them or has an
        override for them."""
        if not is_valid_user_id(user_id):
            raise bad_id("user_id", user_id, ID_RANGE_SHORT)
        return history.explain(await self._store.explain_inputs(user_id))
