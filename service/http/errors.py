"""Every error leaves the service as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from service.domain.errors import DomainError

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "validation_error": 422,
    "malformed_json": 400,
    "segment_exists": 409,
    "segment_not_found": 404,
    "audience_not_found": 404,
    "audience_empty": 422,
    "promo_conflict": 409,
    "cp_unavailable": 502,
    "cp_rejected": 502,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unauthorized": 401,
    "forbidden": 403,
    "rate_limited": 429,
    "invalid_link": 403,
    "link_expired": 410,
    "storage_unavailable": 503,
    "internal_error": 500,
}


class ApiError(Exception):
    """An error raised by the HTTP layer itself (bad content type, bad JSON, ...)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


def error_response(
    code: str, message: str, details: dict[str, Any] | None = None, status: int | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return web.Response(
        body=orjson.dumps(body),
        status=status or STATUS_BY_CODE.get(code, 400),
        content_type="application/json",
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DomainError as exc:
        return error_response(exc.code, exc.message, exc.details)
    except ApiError as exc:
        return error_response(exc.code, exc.message, exc.details)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response("payload_too_large", exc.text or "request body too large")
    except web.HTTPNotFound:
        return error_response("not_found", f"no route for {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            "method_not_allowed",
            f"{request.method} is not allowed here",
            {"allowed": sorted(exc.allowed_methods)},
        )
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response("internal_error", "internal error; it has been logged")
