"""Sending a call: the session, JSON in and out, an error answer turned into its
exception, and the retries of the answers that mean "not now" (the rules are in
``client``'s docstring)."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import msgspec

from user_segments_client.errors import (
    RateLimited,
    SegmentsError,
    ServiceUnavailable,
    SyncInProgress,
    error_from,
)

T = TypeVar("T")

VERSION = "0.1.0"


# The first retry waits about this long when the answer has no Retry-After; each further
# one twice as long.  Short, because a 503 or a promo lock usually clears within moments.
_BACKOFF_BASE_S = 0.2

_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.json.Decoder(kind)
    return dec


class Transport:
    """One client's connection to the service: ``base_url``, the token's headers, the
    session (the caller's, or its own, created on first use), the time each call may
    take and how often a "not now" answer is tried again."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        timeout_s: float,
        session: aiohttp.ClientSession | None,
        max_attempts: int,
        max_retry_wait_s: float,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if max_retry_wait_s < 0:
            raise ValueError("max_retry_wait_s must be >= 0")
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._max_retry_wait_s = max_retry_wait_s
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._open_headers = {
            "Accept": "application/json",
            "User-Agent": f"user-segments-client/{VERSION}",
        }
        self._headers = dict(self._open_headers)
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"

    async def close(self) -> None:
        """Close the client's own session (a session passed in is left open)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def call(self, method: str, path: str, kind: type[T], body: Any = None) -> T:
        """One JSON call, its answer decoded as ``kind``."""
        status, raw = await self.send(method, path, body)
        try:
            return _decoder(kind).decode(raw)
        except msgspec.DecodeError as exc:  # msgspec.ValidationError is a DecodeError
            raise SegmentsError(
                status, "invalid_response", f"{method} {path}: unexpected answer: {exc}"
            ) from exc

    async def send(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """One call with its retries: the status and body of its successful answer."""
        headers = self._headers
        data = None
        if body is not None:
            data = msgspec.json.encode(body)
            headers = {**headers, "Content-Type": "application/json"}
        url = self.base_url + path
        return await self._retrying(lambda left: self._attempt(method, url, data, headers, left))

    async def open_stream(
        self, url: str, params: dict[str, str], accept: str
    ) -> aiohttp.ClientResponse:
        """A GET whose body is read as it arrives, sent without the token (a report link
        is its own credential), retried like any call until the answer starts."""
        headers = {**self._open_headers, "Accept": accept}
        return await self._retrying(lambda left: self._open_stream_once(url, params, headers, left))

    async def _retrying(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        tried = 1
        while True:
            try:
                return await attempt(deadline - loop.time())
            except SegmentsError as exc:
                if tried >= self._max_attempts or not _retryable(exc):
                    raise
                wait = self._wait_before_retry(exc.retry_after_s, tried)
                # A retry that cannot get an answer before the deadline would only turn
                # this error into a timeout: give the caller the real reason instead.
                if loop.time() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
                tried += 1

    async def _attempt(
        self,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        time_left_s: float,
    ) -> tuple[int, bytes]:
        session = self._get_session()
        try:
            async with session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(time_left_s, 0.001)),
                raise_for_status=False,
            ) as response:
                status = response.status
                raw = await response.read()
                retry_after = response.headers.get("Retry-After")
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise ServiceUnavailable(
                None, "timeout", f"{method} {url}: no answer within {self._timeout_s:g} s"
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServiceUnavailable(None, "connection_error", f"{method} {url}: {exc!r}") from exc
        if 200 <= status < 300:
            return status, raw
        raise error_from(status, raw, parse_retry_after(retry_after))

    async def _open_stream_once(
        self,
        url: str,
        params: dict[str, str],
        headers: dict[str, str],
        time_left_s: float,
    ) -> aiohttp.ClientResponse:
        session = self._get_session()
        # No total: a month's CSV may take longer than timeout_s; each wait may not.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=max(time_left_s, 0.001), sock_read=self._timeout_s
        )
        try:
            response = await session.request(
                "GET", url, params=params, headers=headers, timeout=timeout, raise_for_status=False
            )
            if 200 <= response.status < 300:
                return response
            try:
                raw = await response.read()
            finally:
                response.release()
        except TimeoutError as exc:
            raise ServiceUnavailable(
                None, "timeout", f"GET report: no answer within {self._timeout_s:g} s"
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServiceUnavailable(None, "connection_error", f"GET report: {exc!r}") from exc
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise error_from(response.status, raw, retry_after)

    def _wait_before_retry(self, retry_after_s: float | None, attempt: int) -> float:
        if retry_after_s is not None:
            # The service knows when it expects to be free; the cap keeps a large value
            # from stalling the caller (who can still retry later by itself).
            return min(retry_after_s, self._max_retry_wait_s)
        # Jitter, so that callers turned away together do not all come back together.
        backoff = _BACKOFF_BASE_S * 2.0 ** (attempt - 1) * random.uniform(0.5, 1.5)  # nosec B311
        return min(backoff, self._max_retry_wait_s)


def _retryable(exc: SegmentsError) -> bool:
    # Only answers that mean "not now": a connection error or a timeout is not retried,
    # and neither is any other error (see ``client``'s docstring).
    return exc.status == 503 or isinstance(exc, RateLimited | SyncInProgress)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds from now: delay-seconds, or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)
