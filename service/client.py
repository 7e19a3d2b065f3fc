"""Typed async client of the user-segments promo sync API, for MPS.

This module is meant to be copied (vendored) into other services, so it depends only on
aiohttp, msgspec and the standard library, and imports nothing else from this repository.

Usage::

    async with SegmentsClient("http://user-segments:8080", token="...") as client:
        result = await client.sync_segments(42, "LOYAL", date(2030, 1, 31), "promo-17")
        active = await client.sync_count(1001)

Errors are raised as subclasses of ``SegmentsError``:

* ``AudienceNotFound``: 404 ``audience_not_found``, the merchant has no such audience.
* ``InvalidSyncRequest``: 400/422, e.g. ``end_date`` in the past, a bad ``promo_id`` or an
  empty audience.  Retrying the same request will not help.
* ``PromoConflict``: 409 ``promo_conflict``, the promo was already synced with another
  audience or ``end_date``.
* ``CpUnavailable``: 502 ``cp_unavailable``, the downstream targeting service (CP) failed.
  Retry later with the same ``promo_id``.
* ``ServiceUnavailable``: 503, a gateway error without our error body, a refused or
  dropped connection, or a timeout.  Retry later with the same ``promo_id``.

Repeating a ``sync_segments`` call with the same ``promo_id`` (and the same audience and
``end_date``) is always safe: the service syncs a promo once, never counts a customer twice
for it, and answers a repeat with the first sync's result.
"""

from __future__ import annotations

import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import msgspec

__all__ = [
    "AudienceNotFound",
    "CpUnavailable",
    "InvalidSyncRequest",
    "PromoConflict",
    "SegmentsClient",
    "SegmentsError",
    "ServiceUnavailable",
    "SyncResult",
]


class SyncResult(msgspec.Struct, frozen=True):
    """The outcome of syncing one audience to CP for one promo."""

    promo_id: str
    synced: int
    """Customers added to the promo's CP segment."""
    skipped_over_threshold: int
    """Customers left out because they are already in too many active promo segments."""
    cp_segment_id: str


class SegmentsError(Exception):
    """An error answer of the segments service, or a failure to reach it.

    ``status`` is the HTTP status, or ``None`` when no answer arrived.  ``code``,
    ``message`` and ``details`` come from the service's ``{"error": {...}}`` body.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status if status is not None else '-'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details if details is not None else {}


class AudienceNotFound(SegmentsError):
    """404 ``audience_not_found``: there is no such audience for the merchant."""


class InvalidSyncRequest(SegmentsError):
    """400/422: the request breaks a rule (past ``end_date``, bad ``promo_id``, ...)."""


class PromoConflict(SegmentsError):
    """409 ``promo_conflict``: the promo was synced with another audience or end_date."""


class CpUnavailable(SegmentsError):
    """502 ``cp_unavailable``: CP, the downstream targeting service, failed.

    Nothing was counted for the promo.  Retry later with the same ``promo_id``: repeating
    a ``promo_id`` is safe and never counts a customer twice.
    """


class ServiceUnavailable(SegmentsError):
    """503, a gateway error, a connection error or a timeout: the service is unreachable.

    Retry later with the same ``promo_id``: repeating a ``promo_id`` is safe and never
    counts a customer twice.
    """


class _ErrorInfo(msgspec.Struct):
    code: str
    message: str = ""
    details: dict[str, Any] = {}


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorInfo


class _SyncCount(msgspec.Struct):
    customer_id: int
    active_synced_segments: int


class SegmentsClient:
    """Client of the segments service's promo sync API.

    A ``session`` passed in belongs to the caller, who closes it; otherwise the client
    creates its own on first use and ``close()`` (or leaving ``async with``) closes it.
    ``timeout_s`` bounds each call as a whole.  The client never retries by itself.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        token: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._headers = {"Accept": "application/json"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"

    async def sync_segments(
        self,
        merchant_id: int,
        segment_type: str,
        end_date: datetime.date,
        promo_id: str,
    ) -> SyncResult:
        """Sync the merchant's ``segment_type`` audience to CP for ``promo_id``.

        The promo's CP segment expires at the end of ``end_date`` (UTC).  Safe to repeat:
        calling again with the same ``promo_id``, audience and ``end_date`` (for example
        after ``CpUnavailable``, ``ServiceUnavailable`` or a lost answer) never counts a
        customer twice, and returns the same ``SyncResult`` once the sync has succeeded.
        Reusing a ``promo_id`` with another audience or ``end_date`` raises
        ``PromoConflict``.
        """
        if isinstance(end_date, datetime.datetime) or not isinstance(end_date, datetime.date):
            raise TypeError("end_date must be a datetime.date (not a datetime)")
        path = f"/v1/merchants/{int(merchant_id)}/segments/{quote(segment_type, safe='')}/sync"
        body = msgspec.json.encode({"promo_id": promo_id, "end_date": end_date.isoformat()})
        status, raw = await self._request("POST", path, body)
        try:
            return msgspec.json.decode(raw, type=SyncResult)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise _bad_answer(status, exc) from exc

    async def sync_count(self, customer_id: int) -> int:
        """How many active (not yet expired) promo segments the customer was synced into."""
        status, raw = await self._request("GET", f"/v1/customers/{int(customer_id)}/sync-count")
        try:
            answer = msgspec.json.decode(raw, type=_SyncCount)
        except msgspec.DecodeError as exc:
            raise _bad_answer(status, exc) from exc
        if answer.customer_id != customer_id:
            raise SegmentsError(
                status,
                "invalid_response",
                f"asked for customer {customer_id}, got customer {answer.customer_id}",
            )
        return answer.active_synced_segments

    async def close(self) -> None:
        """Close the client's own session (a session passed in is left open)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = self._headers
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                data=body,
                headers=headers,
                timeout=self._timeout,
                raise_for_status=False,
            ) as response:
                status = response.status
                raw = await response.read()
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise ServiceUnavailable(
                None, "timeout", f"{method} {path}: no answer within {self._timeout.total}s"
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServiceUnavailable(None, "connection_error", f"{method} {path}: {exc!r}") from exc
        if status == 200:
            return status, raw
        raise _error_from(status, raw)


_BY_CODE: dict[str, type[SegmentsError]] = {
    "audience_not_found": AudienceNotFound,
    "promo_conflict": PromoConflict,
    "cp_unavailable": CpUnavailable,
}


def _error_from(status: int, raw: bytes) -> SegmentsError:
    try:
        info: _ErrorInfo | None = msgspec.json.decode(raw, type=_ErrorEnvelope).error
    except msgspec.DecodeError:
        info = None
    if info is None:
        # Not the service's own error body: a proxy or load balancer answered.
        code = f"http_{status}"
        message = raw[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
        cls = ServiceUnavailable if status in (502, 503, 504) else SegmentsError
        return cls(status, code, message)
    known = _BY_CODE.get(info.code)
    if known is not None:
        cls = known
    elif status in (400, 422):
        cls = InvalidSyncRequest
    elif status == 503:
        cls = ServiceUnavailable
    else:
        cls = SegmentsError
    return cls(status, info.code, info.message, info.details)


def _bad_answer(status: int, exc: Exception) -> SegmentsError:
    return SegmentsError(status, "invalid_response", f"unexpected answer: {exc}")
