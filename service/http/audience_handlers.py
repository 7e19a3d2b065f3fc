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
from service.domain.promos import Promo, PromoService
from service.http import schemas
from service.http.handlers import answer, decode, id_param, utc


def _sync_out(promo: Promo) -> schemas.SyncOut:
    return schemas.SyncOut(
        promo_id=promo.promo_id,
        synced=promo.synced,
        skipped_over_threshold=promo.skipped,
        cp_segment_id=promo.cp_segment_id,
    )


def _promo_out(promo: Promo) -> schemas.PromoOut:
    return schemas.PromoOut(
        promo_id=promo.promo_id,
        merchant_id=promo.key.merchant_id,
        segment_type=promo.key.segment_type,
        end_date=promo.end_date,
        state=promo.state,
        synced=promo.synced,
        skipped_over_threshold=promo.skipped,
        cp_segment_id=promo.cp_segment_id,
        attempts=promo.attempts,
        last_error=promo.last_error,
        updated_at=utc(promo.updated_at),
    )


def _audience_out(info: AudienceInfo) -> schemas.AudienceOut:
    return schemas.AudienceOut(
        merchant_id=info.key.merchant_id,
        segment_type=info.key.segment_type,
        customers=info.customers,
        version=info.version,
        updated_at=utc(info.updated_at),
    )


def _key(request: web.Request) -> AudienceKey:
    return audience_key(id_param(request, "merchant_id"), request.match_info["segment_type"])


class AudienceHandlers:
    def __init__(
        self, audiences: AudienceService, promos: PromoService, max_body_bytes: int
    ) -> None:
        self._svc = audiences
        self._promos = promos
        self._max_body = max_body_bytes

    async def replace(self, request: web.Request) -> web.Response:
        key = _key(request)
        body = await decode(request, schemas.CustomersReplace, self._max_body)
        info = await self._svc.apply(AudienceChange(key, "replace", add=body.customer_ids))
        assert info is not None
        return answer(_audience_out(info))

    async def patch(self, request: web.Request) -> web.Response:
        key = _key(request)
        body = await decode(request, schemas.CustomersPatch, self._max_body)
        info = await self._svc.apply(AudienceChange(key, "patch", add=body.add, remove=body.remove))
        assert info is not None
        return answer(_audience_out(info))

    async def get(self, request: web.Request) -> web.Response:
        key = _key(request)
        return answer(_audience_out(await self._svc.get(key)))

    async def sync(self, request: web.Request) -> web.Response:
        key = _key(request)
        body = await decode(request, schemas.SyncRequest, 64 * 1024)
        promo = await self._promos.sync(key, body.promo_id, body.end_date)
        return answer(_sync_out(promo))

    async def promo(self, request: web.Request) -> web.Response:
        return answer(_promo_out(await self._promos.status(request.match_info["promo_id"])))

    async def cancel_promo(self, request: web.Request) -> web.Response:
        await self._promos.cancel(request.match_info["promo_id"])
        return web.Response(status=204)

    async def sync_count(self, request: web.Request) -> web.Response:
        customer_id = id_param(request, "customer_id")
        count = await self._promos.sync_count(customer_id)
        return answer(schemas.SyncCount(customer_id, count))
