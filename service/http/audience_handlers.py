"""Handlers of the merchant audience, promo sync and counter routes."""

from __future__ import annotations

from aiohttp import web

from service.domain.audiences import (
    AudienceChange,
    AudienceInfo,
    AudienceKey,
    AudienceService,
    audience_key,
)
from service.http import schemas
from service.http.handlers import _iso, _json, decode, user_id_from


def _audience_body(info: AudienceInfo) -> dict[str, object]:
    return {
        "merchant_id": info.key.merchant_id,
        "segment_type": info.key.segment_type,
        "customers": info.customers,
        "version": info.version,
        "updated_at": _iso(info.updated_at),
    }


def _key(request: web.Request) -> AudienceKey:
    return audience_key(user_id_from(request, "merchant_id"), request.match_info["segment_type"])


class AudienceHandlers:
    def __init__(self, audiences: AudienceService, max_body_bytes: int) -> None:
        self._svc = audiences
        self._max_body = max_body_bytes

    async def replace(self, request: web.Request) -> web.Response:
        key = _key(request)
        body = await decode(request, schemas.CustomersReplace, self._max_body)
        info = await self._svc.apply(AudienceChange(key, "replace", add=body.customer_ids))
        assert info is not None
        return _json(_audience_body(info))

    async def patch(self, request: web.Request) -> web.Response:
        key = _key(request)
        body = await decode(request, schemas.CustomersPatch, self._max_body)
        info = await self._svc.apply(AudienceChange(key, "patch", add=body.add, remove=body.remove))
        assert info is not None
        return _json(_audience_body(info))

    async def get(self, request: web.Request) -> web.Response:
        key = _key(request)
        return _json(_audience_body(await self._svc.get(key)))

    async def sync(self, request: web.Request) -> web.Response:
        key = _key(request)
        body = await decode(request, schemas.SyncRequest, 64 * 1024)
        result = await self._svc.sync(key, body.promo_id, body.end_date)
        return _json(
            {
                "promo_id": result.promo_id,
                "synced": result.synced,
                "skipped_over_threshold": result.skipped_over_threshold,
                "cp_segment_id": result.cp_segment_id,
            }
        )

    async def sync_count(self, request: web.Request) -> web.Response:
        customer_id = user_id_from(request, "customer_id")
        count = await self._svc.sync_count(customer_id)
        return _json({"customer_id": customer_id, "active_synced_segments": count})
