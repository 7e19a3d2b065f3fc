"""The client: one method per operation of the API, typed results, typed errors.

Retries: a call that gets a 503 (``storage_unavailable``, ``outcome_unknown``, or a
proxy's 503), a 429 ``rate_limited`` or a 409 ``sync_in_progress`` is repeated, up to
``max_attempts`` attempts in all, waiting as ``Retry-After`` says (at most
``max_retry_wait_s`` each time) or a short jittered backoff when it says nothing, and
never past ``timeout_s``, which bounds each call as a whole.  These answers mean "not
now" and repeating the same request is safe: the service changed nothing (503
``storage_unavailable``, 429, 409), or may have and a repeat applies the same change
again (503 ``outcome_unknown``).  Nothing else is retried: not CP's failures (the service
already retried CP within the call), not a timeout or a connection error (they used up
the call's time or point at a service that is down).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
import msgspec

from user_segments_client import models
from user_segments_client.errors import SegmentsError, ServiceUnavailable
from user_segments_client.models import (
    AddSegment,
    Audience,
    PromoStatus,
    ReportLink,
    Segment,
    SegmentExplanation,
    SyncResult,
)
from user_segments_client.paths import (
    audience_path,
    check_echo,
    checked_id,
    customers_path,
    promo_path,
    segment_path,
)
from user_segments_client.transport import VERSION as VERSION
from user_segments_client.transport import Transport
from user_segments_client.transport import parse_retry_after as parse_retry_after

__all__ = ["BATCH_MAX_USERS", "SegmentsClient"]

BATCH_MAX_USERS = 1000
"""The most user ids one ``POST /v1/users/segments:batch`` takes; ``batch_user_segments``
splits longer lists into calls of this size."""


class SegmentsClient:
    """Async client of the user-segments API.

    ``token`` is sent as ``Authorization: Bearer <token>`` (the service's scopes:
    ``read``, ``write``, ``internal`` for audiences, ``sync`` for promos, ``reports``),
    except to report links, which open without one.  A ``session`` passed in belongs to
    the caller, who closes it; otherwise the client creates its own on first use and
    ``close()`` (or leaving ``async with``) closes it.  ``timeout_s`` bounds each call as
    a whole, its retries and the waits between them included (for ``stream_report``: the
    wait for the answer, then each wait for more of the CSV).  ``max_attempts=1`` turns
    retries off (see the module's docstring).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        max_attempts: int = 3,
        max_retry_wait_s: float = 5.0,
    ) -> None:
        self._http = Transport(
            base_url,
            token=token,
            timeout_s=timeout_s,
            session=session,
            max_attempts=max_attempts,
            max_retry_wait_s=max_retry_wait_s,
        )

    @property
    def base_url(self) -> str:
        """The service's URL (without a trailing slash) that paths are appended to."""
        return self._http.base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        self._http.base_url = value

    # --- Segments -----------------------------------------------------------------------

    async def create_segment(
        self,
        slug: str,
        *,
        auto_percent: float | None = None,
        description: str | None = None,
    ) -> Segment:
        """Create a segment; ``auto_percent`` (0..100, two decimals) makes it include that
        share of all users.  ``SegmentExists`` if a live segment has the slug."""
        body: dict[str, Any] = {"slug": slug}
        if auto_percent is not None:
            body["auto_percent"] = auto_percent
        if description is not None:
            body["description"] = description
        return await self._http.call("POST", "/v1/segments", Segment, body)

    async def list_segments(self) -> list[Segment]:
        """The live segments."""
        answer = await self._http.call("GET", "/v1/segments", models._SegmentList)
        return answer.segments

    async def get_segment(self, slug: str) -> Segment:
        """One live segment; ``SegmentNotFound`` if there is none with that slug."""
        return await self._http.call("GET", segment_path(slug), Segment)

    async def update_segment(
        self,
        slug: str,
        *,
        auto_percent: float | msgspec.UnsetType | None = msgspec.UNSET,
        description: str | msgspec.UnsetType = msgspec.UNSET,
    ) -> Segment:
        """Change the percentage rule (``auto_percent=None`` drops it) or the description;
        what is left out stays as it is."""
        body: dict[str, Any] = {}
        if auto_percent is not msgspec.UNSET:
            body["auto_percent"] = auto_percent
        if description is not msgspec.UNSET:
            body["description"] = description
        return await self._http.call("PATCH", segment_path(slug), Segment, body)

    async def delete_segment(self, slug: str) -> None:
        """Delete a segment: it leaves every user at once (each member gets a ``remove``
        in history), and a later segment with the same slug starts empty."""
        await self._http.send("DELETE", segment_path(slug))

    # --- Users --------------------------------------------------------------------------

    async def get_user_segments(self, user_id: int) -> list[str]:
        """The user's active segments, slugs sorted; ``[]`` for a user never seen (or the
        percentage segments that include them)."""
        uid = checked_id(user_id, "user_id")
        answer = await self._http.call("GET", f"/v1/users/{uid}/segments", models._UserSegments)
        check_echo("user", uid, answer.user_id)
        return answer.segments

    async def update_user_segments(
        self,
        user_id: int,
        *,
        add: Iterable[str | AddSegment] = (),
        remove: Iterable[str] = (),
    ) -> list[str]:
        """Add and remove the user's segments atomically; the user's segments after it.

        An ``add`` item is a slug (no expiry) or an ``AddSegment`` with ``ttl_seconds`` or
        ``expires_at``.  ``SegmentNotFound`` (every unknown slug in
        ``details["slugs"]``) changes nothing.
        """
        uid = checked_id(user_id, "user_id")
        body = {"add": list(add), "remove": list(remove)}
        answer = await self._http.call(
            "POST", f"/v1/users/{uid}/segments", models._UserSegments, body
        )
        check_echo("user", uid, answer.user_id)
        return answer.segments

    async def batch_user_segments(self, user_ids: Iterable[int]) -> dict[int, list[str]]:
        """The segments of many users: user id -> slugs sorted, every id asked for.

        One ``POST /v1/users/segments:batch`` per ``BATCH_MAX_USERS`` distinct ids, one
        after the other (the retries and ``timeout_s`` apply to each call).
        """
        ids = list(dict.fromkeys(checked_id(u, "user_id") for u in user_ids))
        found: dict[int, list[str]] = {}
        for start in range(0, len(ids), BATCH_MAX_USERS):
            chunk = ids[start : start + BATCH_MAX_USERS]
            answer = await self._http.call(
                "POST", "/v1/users/segments:batch", models._BatchSegments, {"user_ids": chunk}
            )
            missing = set(chunk) - answer.users.keys()
            if missing:
                raise SegmentsError(
                    200, "invalid_response", f"no answer for users {sorted(missing)[:10]}"
                )
            found.update(answer.users)
        return found

    async def explain_user_segments(self, user_id: int) -> list[SegmentExplanation]:
        """Why the user is or is not in each live segment that includes them or has an
        override for them (read from PostgreSQL: for investigating, not for serving)."""
        uid = checked_id(user_id, "user_id")
        answer = await self._http.call(
            "GET", f"/v1/users/{uid}/segments:explain", models._UserExplanation
        )
        check_echo("user", uid, answer.user_id)
        return answer.segments

    # --- Merchant audiences -------------------------------------------------------------

    async def replace_audience(
        self, merchant_id: int, segment_type: str, customer_ids: Iterable[int]
    ) -> Audience:
        """Replace the merchant's ``segment_type`` audience (up to 1,000,000 ids in one
        body; readers see the old list or the new one).  Needs the ``internal`` scope."""
        body = {"customer_ids": list(customer_ids)}
        return await self._http.call(
            "PUT", customers_path(merchant_id, segment_type), Audience, body
        )

    async def patch_audience(
        self,
        merchant_id: int,
        segment_type: str,
        *,
        add: Iterable[int] = (),
        remove: Iterable[int] = (),
    ) -> Audience:
        """Add and remove customers of the audience (created by its first change)."""
        body = {"add": list(add), "remove": list(remove)}
        return await self._http.call(
            "PATCH", customers_path(merchant_id, segment_type), Audience, body
        )

    async def get_audience(self, merchant_id: int, segment_type: str) -> Audience:
        """Size, version and last change; ``AudienceNotFound`` if there is none."""
        return await self._http.call("GET", audience_path(merchant_id, segment_type), Audience)

    # --- Promo sync ---------------------------------------------------------------------

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
        path = audience_path(merchant_id, segment_type) + "/sync"
        body = {"promo_id": promo_id, "end_date": end_date.isoformat()}
        return await self._http.call("POST", path, SyncResult, body)

    async def promo_status(self, promo_id: str) -> PromoStatus:
        """The promo's sync state and counts; ``PromoNotFound`` if the service has none."""
        answer = await self._http.call("GET", promo_path(promo_id), PromoStatus)
        check_echo("promo", promo_id, answer.promo_id)
        return answer

    async def cancel_promo(self, promo_id: str) -> None:
        """Cancel the promo: its CP segment is deleted and its customers stop counting.

        Cancelling a cancelled promo is fine; an unknown one raises ``PromoNotFound``.  A
        cancelled promo cannot be synced again (``PromoCancelled``).
        """
        await self._http.send("DELETE", promo_path(promo_id))

    async def sync_count(self, customer_id: int) -> int:
        """How many active (not yet expired) promo segments the customer was synced into."""
        cid = checked_id(customer_id, "customer_id")
        answer = await self._http.call("GET", f"/v1/customers/{cid}/sync-count", models._SyncCount)
        check_echo("customer", cid, answer.customer_id)
        return answer.active_synced_segments

    # --- History reports ----------------------------------------------------------------

    async def create_report(
        self, period: str | datetime.date, *, user_id: int | None = None
    ) -> ReportLink:
        """A signed link to a month of membership history (``"YYYY-MM"``, or any date in
        the month), of every user or of one.  Needs the ``reports`` scope; the link itself
        opens without a token until ``expires_at``."""
        if isinstance(period, datetime.date):
            period = f"{period.year:04d}-{period.month:02d}"
        body: dict[str, Any] = {"period": period}
        if user_id is not None:
            body["user_id"] = checked_id(user_id, "user_id")
        return await self._http.call("POST", "/v1/reports/history", ReportLink, body)

    async def download_report(
        self, link: ReportLink | str, *, lang: Literal["en", "ru"] | None = None
    ) -> str:
        """The CSV behind a report link, whole: ``user_id;segment;operation;timestamp``.

        Sent without the client's token (the link is the credential, and it may name
        another host).  ``InvalidLink`` if it was altered, ``LinkExpired`` once it
        expired.  For a large month, ``stream_report`` keeps memory flat.
        """
        chunks = [chunk async for chunk in self.stream_report(link, lang=lang)]
        return b"".join(chunks).decode("utf-8")

    async def stream_report(
        self,
        link: ReportLink | str,
        *,
        lang: Literal["en", "ru"] | None = None,
        chunk_size: int = 64 * 1024,
    ) -> AsyncIterator[bytes]:
        """The CSV behind a report link, as it arrives, in chunks of up to ``chunk_size``
        bytes.  Errors before the first chunk are raised as by ``download_report`` (a 503
        is retried); a connection lost after it raises ``ServiceUnavailable``.  Wrap it in
        ``contextlib.aclosing`` when you may stop early, so the connection is closed at
        once."""
        url = link.url if isinstance(link, ReportLink) else link
        if url.startswith("/"):
            url = self.base_url + url
        params: dict[str, str] = {} if lang is None else {"lang": lang}
        response = await self._http.open_stream(url, params, "text/csv")
        done = False
        try:
            async for chunk in response.content.iter_chunked(chunk_size):
                yield chunk
            done = True
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServiceUnavailable(
                None, "connection_error", f"GET report: the CSV broke off: {exc!r}"
            ) from exc
        finally:
            if done:
                response.release()
            else:
                response.close()

    # --- Lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Close the client's own session (a session passed in is left open)."""
        await self._http.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
