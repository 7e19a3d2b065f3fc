"""Every error leaves the service as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import math
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
    "promo_cancelled": 409,
    "promo_not_found": 404,
    "sync_in_progress": 409,
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
    "outcome_unknown": 503,
    "internal_error": 500,
}


# Unavailable stores come back by themselves: every such answer says when to retry.
_RETRY_AFTER_S = {"storage_unavailable": 1, "outcome_unknown": 1}


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
    response = web.Response(
        body=orjson.dumps(body),
        status=status or STATUS_BY_CODE.get(code, 400),
        content_type="application/json",
    )
    retry_after = (details or {}).get("retry_after_s", _RETRY_AFTER_S.get(code))
    if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
        # Every error that says when to come back says it in the standard header too.
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def error_for(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer to an exception a handler raised.

    Called by the request middleware (``service/http/middleware.py: observe``, one layer
    for errors, request ids, logs and metrics).  An HTTPException without a JSON form
    here (a redirect, a static file's 304, ...) is re-raised for aiohttp to send as is.
    """
    if isinstance(exc, DomainError | ApiError):
        return error_response(exc.code, exc.message, exc.details)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response("payload_too_large", exc.text or "request body too large")
    if isinstance(exc, web.HTTPNotFound):
        return error_response("not_found", f"no route for {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response = error_response(
            "method_not_allowed",
            f"{request.method} is not allowed here",
            {"allowed": sorted(exc.allowed_methods)},
        )
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    if isinstance(exc, web.HTTPException):
        raise exc
    log.exception("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response("internal_error", "internal error; it has been logged")
