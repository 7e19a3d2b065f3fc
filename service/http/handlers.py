"""Route handlers: decode and validate at the boundary, call the service, encode."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, TypeVar

import msgspec
import orjson
from aiohttp import web

from service.domain.errors import InvalidRequest
from service.domain.history import Explanation
from service.domain.model import Segment
from service.domain.reports import LABELS, HistoryReports
from service.domain.rules import USER_ID_MAX, USER_ID_MIN, bad_id
from service.domain.service import AddRequest, SegmentService
from service.http import schemas
from service.http.errors import ApiError

T = TypeVar("T")

BODY_READ_TIMEOUT_S = 30.0

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


_JSON = "application/json"


def _json(body: Any, status: int = 200) -> web.Response:
    # Setting the header directly skips aiohttp's content_type parsing (hot path).
    return web.Response(body=orjson.dumps(body), status=status, headers={"Content-Type": _JSON})


def answer(body: msgspec.Struct, status: int = 200) -> web.Response:
    """A JSON answer encoded from its response Struct (schemas.py, the document's too)."""
    encoded = msgspec.json.encode(body)
    return web.Response(body=encoded, status=status, headers={"Content-Type": _JSON})


def utc(value: dt.datetime) -> dt.datetime:
    # msgspec writes an aware UTC datetime with "Z", as clients have always read it.
    return value.astimezone(dt.UTC)


def _utc_epoch(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def segment_out(segment: Segment) -> schemas.SegmentOut:
    return schemas.SegmentOut(
        slug=segment.slug,
        description=segment.description,
        auto_percent=segment.auto_percent,
        created_at=utc(segment.created_at),
    )


def explanation_out(e: Explanation) -> schemas.SegmentExplanation:
    return schemas.SegmentExplanation(
        slug=e.slug,
        included=e.included,
        source=e.source,  # type: ignore[arg-type]
        expires_at=msgspec.UNSET if e.expires_at is None else _utc_epoch(e.expires_at),
        rule=(
            msgspec.UNSET
            if e.auto_bp is None  # a rule comes with the user's bucket
            else schemas.RuleOut(auto_percent=e.auto_bp / 100, bucket=e.bucket or 0)
        ),
        since=msgspec.UNSET if e.since is None else _utc_epoch(e.since),
    )


async def decode(request: web.Request, kind: type[T], max_bytes: int) -> T:
    """Read and validate a JSON body: 415, 413, 400 and 422 each say what to fix."""
    if request.content_type != "application/json":
        raise ApiError(
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
            {"content_type": request.content_type},
        )
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    if request.content.is_eof():
        # The whole body came with the headers (the usual small JSON body): nothing to
        # wait for, so no timer (asyncio.timeout costs 4.3 us, ~1% of a write).
        raw = await request.read()
    else:
        try:
            # A client that trickles its body must not hold the worker for long.
            async with asyncio.timeout(BODY_READ_TIMEOUT_S):
                raw = await _read_at_most(request, max_bytes)
        except TimeoutError:
            raise ApiError(
                "request_timeout", f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s"
            ) from None
    if len(raw) > max_bytes:
        raise _too_large(max_bytes)
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return dec.decode(raw)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError("malformed_json", f"the body is not valid JSON: {exc}") from None


async def _read_at_most(request: web.Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes ``max_bytes``: a chunked body has no
    Content-Length to check first, and ``request.read()`` would take it whole, up to
    aiohttp's app-wide limit (the largest route's, twice over)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        "payload_too_large", f"the body is limited to {max_bytes} bytes", {"limit": max_bytes}
    )


def id_param(request: web.Request, name: str) -> int:
    """The path parameter ``name``: a positive 64-bit id (a user, customer or merchant)."""
    return parse_id(request.match_info[name], name)


def parse_id(raw: str, name: str = "user_id") -> int:
    """``raw`` as a positive 64-bit id; 422 naming ``name`` if it is not one."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    # ASCII digits only: int() would also take "١" (Arabic-Indic one) or " 1".
    # The bounds inline (not rules.is_valid_user_id): this is on every read.
    if not USER_ID_MIN <= value <= USER_ID_MAX or not (raw.isascii() and raw.isdigit()):
        raise bad_id(name, raw)
    return value


class Handlers:
    def __init__(
        self,
        segments: SegmentService,
        reports: HistoryReports,
        max_body_bytes: int,
        public_base_url: str = "",
    ) -> None:
        self._svc = segments
        self._reports = reports
        self._max_body = max_body_bytes
        self._base_url = public_base_url.rstrip("/")

    async def create_segment(self, request: web.Request) -> web.Response:
        body = await decode(request, schemas.SegmentCreate, self._max_body)
        segment = await self._svc.create_segment(body.slug, body.description, body.auto_percent)
        return answer(segment_out(segment), status=201)

    async def list_segments(self, request: web.Request) -> web.Response:
        segments = await self._svc.list_segments()
        return answer(schemas.SegmentList([segment_out(s) for s in segments]))

    async def get_segment(self, request: web.Request) -> web.Response:
        return answer(segment_out(await self._svc.get_segment(request.match_info["slug"])))

    async def update_segment(self, request: web.Request) -> web.Response:
        body = await decode(request, schemas.SegmentUpdate, self._max_body)
        set_auto = body.auto_percent is not msgspec.UNSET
        segment = await self._svc.update_segment(
            request.match_info["slug"],
            description=None if body.description is msgspec.UNSET else body.description,
            auto_percent=None if body.auto_percent is msgspec.UNSET else body.auto_percent,
            set_auto=set_auto,
        )
        return answer(segment_out(segment))

    async def delete_segment(self, request: web.Request) -> web.Response:
        await self._svc.delete_segment(request.match_info["slug"])
        return web.Response(status=204)

    async def update_user_segments(self, request: web.Request) -> web.Response:
        user_id = id_param(request, "user_id")
        body = await decode(request, schemas.UserSegmentsUpdate, self._max_body)
        add = [
            AddRequest(item)
            if isinstance(item, str)
            else AddRequest(
                item.slug,
                item.ttl_seconds,
                None if item.expires_at is None else item.expires_at.timestamp(),
            )
            for item in body.add
        ]
        segments = await self._svc.update_user(user_id, add, body.remove)
        return answer(schemas.UserSegments(user_id, segments))

    async def batch_user_segments(self, request: web.Request) -> web.Response:
        body = await decode(request, schemas.BatchRead, self._max_body)
        found = await self._svc.users_segments(body.user_ids)
        return answer(schemas.BatchSegments({str(uid): slugs for uid, slugs in found.items()}))

    async def get_user_segments(self, request: web.Request) -> web.Response:
        return await self.user_segments(request.match_info["user_id"])

    async def user_segments(self, raw_user_id: str) -> web.Response:
        """GET /v1/users/{user_id}/segments, for the route and for the front door
        (service/http/serving.py), which takes the id from the path itself.  Encoded
        from a dict with orjson, not from ``schemas.UserSegments``: the same bytes, and
        the Struct was no faster here."""
        user_id = parse_id(raw_user_id)
        segments = await self._svc.user_segments(user_id)
        return _json({"user_id": user_id, "segments": segments})

    async def create_report(self, request: web.Request) -> web.Response:
        body = await decode(request, schemas.ReportRequest, self._max_body)
        token, expires_at = self._reports.create_link(body.period, body.user_id)
        base = self._base_url or str(request.url.origin())
        link = schemas.ReportLink(f"{base}/v1/reports/history/{token}", _utc_epoch(expires_at))
        return answer(link, status=201)

    async def explain_user_segments(self, request: web.Request) -> web.Response:
        user_id = id_param(request, "user_id")
        explained = await self._reports.explain(user_id)
        return answer(schemas.UserExplanation(user_id, [explanation_out(e) for e in explained]))

    async def download_report(self, request: web.Request) -> web.StreamResponse:
        # Validate the link before the first byte: errors are still JSON.  The link is
        # the credential: no Authorization header is needed (its scope in routes.py).
        start, end, user_id, period = self._reports.open_link(request.match_info["token"])
        lang = request.query.get("lang", "en")
        if lang not in LABELS:
            raise InvalidRequest(f"lang must be one of {sorted(LABELS)}", {"lang": lang})
        suffix = "" if user_id is None else f"-user-{user_id}"
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="history-{period}{suffix}.csv"',
                "Cache-Control": "no-store",
            }
        )
        await response.prepare(request)
        if request.method != "HEAD":  # a HEAD checks the link: no month of history for it
            await self._reports.write_csv(start, end, user_id, response.write, lang)
        await response.write_eof()
        return response
