"""Typed async client of the user-segments promo sync API, for MPS.

This module is meant to be copied (vendored) into other services, so it depends only on
aiohttp, msgspec and the standard library, and imports nothing else from this repository.

Usage::

    async with SegmentsClient("http://user-segments:8080", token="...") as client:
        result = await client.sync_segments(42, "LOYAL", date(2030, 1, 31), "promo-17")
        status = await client.promo_status("promo-17")
        active = await client.sync_count(1001)
        await client.cancel_promo("promo-17")

Errors are raised as subclasses of ``SegmentsError``, chosen by the error code of the
service's body first and by the HTTP status when the code is not one listed here:

* ``AudienceNotFound``: 404 ``audience_not_found``, the merchant has no such audience.
* ``PromoNotFound``: 404 ``promo_not_found``, the service knows no such promo.
* ``InvalidSyncRequest``: 400/422, e.g. ``end_date`` in the past or more than 366 days
  ahead, a bad ``promo_id`` or an empty audience (``audience_empty``).  Retrying the same
  request will not help.
* ``PromoConflict``: 409 ``promo_conflict``, the ``promo_id`` is already used for another
  merchant or segment type.
* ``PromoCancelled``: 409 ``promo_cancelled``, the promo was cancelled; it cannot be synced
  again.
* ``SyncInProgress``: 409 ``sync_in_progress``, another call for the promo is running.
  Retried by the client (see below); raised when the retries run out.
* ``Unauthorized``: 401, no token or a token the service does not know.
* ``Forbidden``: 403, the token lacks the scope the route needs.
* ``RateLimited``: 429, the caller sends too many requests.  Retried by the client.
* ``CpUnavailable``: 502 ``cp_unavailable``, the downstream targeting service (CP) failed.
* ``CpRejected``: 502 ``cp_rejected``, CP refused the service's request.
* ``ServiceUnavailable``: 503 (e.g. ``storage_unavailable``), a gateway error without our
  error body, a refused or dropped connection, or a timeout.  A 503 is retried by the
  client.

After ``CpUnavailable`` or ``CpRejected`` nothing is in force for the promo: no customer
was counted and its CP segment was undone; ``promo_status`` shows it as ``"failed"``.

Every call is idempotent, so the client may repeat it and so may the caller.
``sync_segments`` brings the promo's CP segment up to date: a repeat with the same
``promo_id`` after the audience or ``end_date`` changed updates CP, and a repeat with
nothing changed answers the same result without calling CP.  Either way a customer is
never counted twice for one promo.  ``promo_status`` only reads, and ``cancel_promo`` of a
cancelled promo answers as the first one did.

Retries: the client repeats a call that got a 503, a 429 or a 409 ``sync_in_progress``
(the service is busy or the promo is locked for a moment), up to ``max_attempts`` attempts
in all, waiting as ``Retry-After`` says (at most ``max_retry_wait_s`` each time) or a short
jittered backoff when it says nothing, and never past ``timeout_s``.  It does not retry
``CpUnavailable``/``CpRejected``: the service has already retried CP within the call, a CP
outage usually outlasts a few seconds, and whether to try again later or give up on the
promo is the caller's decision.  Nor does it retry a timeout or a connection error, which
already used up the call's time or point at a service that is down.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import random
import time
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import aiohttp
import msgspec

__all__ = [
    "AudienceNotFound",
    "CpRejected",
    "CpUnavailable",
    "Forbidden",
    "InvalidSyncRequest",
    "PromoCancelled",
    "PromoConflict",
    "PromoNotFound",
    "PromoState",
    "PromoStatus",
    "RateLimited",
    "SegmentsClient",
    "SegmentsError",
    "ServiceUnavailable",
    "SyncInProgress",
    "SyncResult",
    "Unauthorized",
]


class SyncResult(msgspec.Struct, frozen=True):
    """The outcome of syncing one audience to CP for one promo."""

    promo_id: str
    synced: int
    """Customers in the promo's CP segment."""
    skipped_over_threshold: int
    """Customers left out because they are already in too many active promo segments."""
    cp_segment_id: str | None
    """The promo's CP segment; ``None`` when no customer passed the threshold, in which
    case nothing was created in CP."""


PromoState = Literal["in_progress", "synced", "failed", "cancelled"]


class PromoStatus(msgspec.Struct, frozen=True):
    """What the service knows about one promo's sync."""

    promo_id: str
    merchant_id: int
    segment_type: str
    end_date: datetime.date
    """The promo's CP segment expires at the end of this day (UTC)."""
    state: PromoState
    synced: int
    skipped_over_threshold: int
    cp_segment_id: str | None
    attempts: int
    """Sync attempts so far (calls and the service's own retries)."""
    last_error: str | None
    """Why the last attempt failed, if it did."""
    updated_at: datetime.datetime


class SegmentsError(Exception):
    """An error answer of the segments service, or a failure to reach it.

    ``status`` is the HTTP status, or ``None`` when no answer arrived.  ``code``,
    ``message`` and ``details`` come from the service's ``{"error": {...}}`` body.
    ``retry_after_s`` is the answer's ``Retry-After`` in seconds, if it had one.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status if status is not None else '-'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details if details is not None else {}
        self.retry_after_s = retry_after_s


class AudienceNotFound(SegmentsError):
    """404 ``audience_not_found``: there is no such audience for the merchant."""


class PromoNotFound(SegmentsError):
    """404 ``promo_not_found``: the service knows no promo with this ``promo_id``."""


class InvalidSyncRequest(SegmentsError):
    """400/422: the request breaks a rule (``end_date`` out of range, bad ``promo_id``,
    empty audience, ...).  Repeating it will not help."""


class PromoConflict(SegmentsError):
    """409 ``promo_conflict``: the ``promo_id`` is used for another merchant or segment type."""


class PromoCancelled(SegmentsError):
    """409 ``promo_cancelled``: the promo was cancelled and cannot be synced again."""


class SyncInProgress(SegmentsError):
    """409 ``sync_in_progress``: another call for this promo is running.

    The client has already retried as ``max_attempts`` allows; ``retry_after_s`` says
    when the service expects the promo to be free.
    """


class Unauthorized(SegmentsError):
    """401 ``unauthorized``: no token, or one the service does not know."""


class Forbidden(SegmentsError):
    """403 ``forbidden``: the token lacks the scope this route needs."""


class RateLimited(SegmentsError):
    """429 ``rate_limited``: too many requests; the client's retries ran out."""


class CpUnavailable(SegmentsError):
    """502 ``cp_unavailable``: CP, the downstream targeting service, failed.

    Nothing is in force for the promo: no customer was counted and its CP segment was
    undone.  Not retried by the client; retry later with the same ``promo_id`` if the
    promo should still go out (repeating a ``promo_id`` never counts a customer twice).
    """


class CpRejected(SegmentsError):
    """502 ``cp_rejected``: CP refused the service's request.

    Nothing is in force for the promo, as after ``CpUnavailable``.  Not retried by the
    client: the same request is likely to be refused again.
    """


class ServiceUnavailable(SegmentsError):
    """503, a gateway error, a connection error or a timeout: the service is unreachable.

    A 503 was already retried as ``max_attempts`` allows.  Retry later with the same
    ``promo_id``: every call is idempotent and never counts a customer twice.
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


# The first retry waits about this long when the answer has no Retry-After; each further
# one twice as long.  Short, because a 503 or a promo lock usually clears within moments.
_BACKOFF_BASE_S = 0.2


class SegmentsClient:
    """Client of the segments service's promo sync API.

    A ``session`` passed in belongs to the caller, who closes it; otherwise the client
    creates its own on first use and ``close()`` (or leaving ``async with``) closes it.
    ``timeout_s`` bounds each call as a whole, its retries and the waits between them
    included.  A call that gets a 503, a 429 or a 409 ``sync_in_progress`` is tried up to
    ``max_attempts`` times in all, waiting as ``Retry-After`` says but at most
    ``max_retry_wait_s`` each time (see the module's docstring); ``max_attempts=1`` turns
    retries off.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        token: str | None = None,
        max_attempts: int = 3,
        max_retry_wait_s: float = 5.0,
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

        The promo's CP segment expires at the end of ``end_date`` (UTC).  Calling again
        with the same ``promo_id`` brings CP up to date with the audience and
        ``end_date`` as they are now; with nothing changed it answers the same
        ``SyncResult`` without calling CP.  It never counts a customer twice, so a repeat
        after ``CpUnavailable``, ``ServiceUnavailable`` or a lost answer is safe.  Reusing
        a ``promo_id`` for another merchant or segment type raises ``PromoConflict``, and
        syncing a cancelled promo raises ``PromoCancelled``.
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

    async def promo_status(self, promo_id: str) -> PromoStatus:
        """The promo's sync state and counts; ``PromoNotFound`` if the service has none."""
        status, raw = await self._request("GET", _promo_path(promo_id))
        try:
            answer = msgspec.json.decode(raw, type=PromoStatus)
        except msgspec.DecodeError as exc:
            raise _bad_answer(status, exc) from exc
        if answer.promo_id != promo_id:
            raise SegmentsError(
                status, "invalid_response", f"asked for promo {promo_id!r}, got {answer.promo_id!r}"
            )
        return answer

    async def cancel_promo(self, promo_id: str) -> None:
        """Cancel the promo: its CP segment is deleted and its customers stop counting.

        Cancelling a cancelled promo is fine; an unknown one raises ``PromoNotFound``.  A
        cancelled promo cannot be synced again (``PromoCancelled``).
        """
        await self._request("DELETE", _promo_path(promo_id))

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
        session = self._session
        headers = self._headers
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        deadline = time.monotonic() + self._timeout_s
        attempt = 1
        while True:
            try:
                return await self._attempt(
                    session, method, path, body, headers, deadline - time.monotonic()
                )
            except SegmentsError as exc:
                if attempt >= self._max_attempts or not _retryable(exc):
                    raise
                wait = self._wait_before_retry(exc.retry_after_s, attempt)
                # A retry that cannot get an answer before the deadline would only turn
                # this error into a timeout: give the caller the real reason instead.
                if time.monotonic() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
                attempt += 1

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        time_left_s: float,
    ) -> tuple[int, bytes]:
        try:
            async with session.request(
                method,
                self.base_url + path,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(time_left_s, 0.001)),
                raise_for_status=False,
            ) as response:
                status = response.status
                raw = await response.read()
                retry_after = response.headers.get("Retry-After")
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise ServiceUnavailable(
                None, "timeout", f"{method} {path}: no answer within {self._timeout_s}s"
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServiceUnavailable(None, "connection_error", f"{method} {path}: {exc!r}") from exc
        if 200 <= status < 300:
            return status, raw
        raise _error_from(status, raw, _parse_retry_after(retry_after))

    def _wait_before_retry(self, retry_after_s: float | None, attempt: int) -> float:
        if retry_after_s is not None:
            # The service knows when it expects to be free; the cap keeps a large value
            # from stalling the caller (who can still retry later by itself).
            return min(retry_after_s, self._max_retry_wait_s)
        # Jitter, so that callers turned away together do not all come back together.
        backoff = _BACKOFF_BASE_S * 2.0 ** (attempt - 1) * random.uniform(0.5, 1.5)  # nosec B311
        return min(backoff, self._max_retry_wait_s)


def _promo_path(promo_id: str) -> str:
    # "", "." and ".." would name another path once quoted (dot segments are resolved in
    # URLs); the service accepts none of them as a promo_id anyway.
    if promo_id in ("", ".", ".."):
        raise ValueError(f"invalid promo_id {promo_id!r}")
    return f"/v1/promos/{quote(promo_id, safe='')}"


def _retryable(exc: SegmentsError) -> bool:
    # Only answers that mean "not now": a connection error or a timeout is not retried
    # (see the module's docstring), and neither is any other error.
    return exc.status == 503 or isinstance(exc, RateLimited | SyncInProgress)


def _parse_retry_after(value: str | None) -> float | None:
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


_BY_CODE: dict[str, type[SegmentsError]] = {
    "audience_not_found": AudienceNotFound,
    "promo_not_found": PromoNotFound,
    "validation_error": InvalidSyncRequest,
    "audience_empty": InvalidSyncRequest,
    "promo_conflict": PromoConflict,
    "promo_cancelled": PromoCancelled,
    "sync_in_progress": SyncInProgress,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "rate_limited": RateLimited,
    "cp_unavailable": CpUnavailable,
    "cp_rejected": CpRejected,
    "storage_unavailable": ServiceUnavailable,
}

# For codes not listed above (a newer service's, or another route's such as 404
# ``not_found`` from a service without the promo routes, which must not read as
# ``PromoNotFound``), and for answers without our error body.
_BY_STATUS: dict[int, type[SegmentsError]] = {
    400: InvalidSyncRequest,
    401: Unauthorized,
    403: Forbidden,
    422: InvalidSyncRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}


def _error_from(status: int, raw: bytes, retry_after_s: float | None) -> SegmentsError:
    try:
        info: _ErrorInfo | None = msgspec.json.decode(raw, type=_ErrorEnvelope).error
    except msgspec.DecodeError:
        info = None
    if info is None:
        # Not the service's own error body: a proxy or load balancer answered.  A 400 or
        # 422 from a proxy says nothing about our request's rules, so it stays generic.
        code = f"http_{status}"
        message = raw[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
        if status in (502, 503, 504):
            cls: type[SegmentsError] = ServiceUnavailable
        elif status in (401, 403, 429):
            cls = _BY_STATUS[status]
        else:
            cls = SegmentsError
        return cls(status, code, message, retry_after_s=retry_after_s)
    cls = _BY_CODE.get(info.code) or _BY_STATUS.get(status, SegmentsError)
    return cls(status, info.code, info.message, info.details, retry_after_s=retry_after_s)


def _bad_answer(status: int, exc: Exception) -> SegmentsError:
    return SegmentsError(status, "invalid_response", f"unexpected answer: {exc}")
