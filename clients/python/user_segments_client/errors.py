"""Typed errors: one class per error code of the API, grouped under a few bases.

Every error answer of the service is ``{"error": {"code", "message", "details"}}``; the
client raises the class of its ``code``, or, for a code it does not know (a newer
service's) or an answer without that body (a proxy's), the base class of its HTTP
status.  Catch a base (``NotFound``, ``Conflict``, ``InvalidRequest``, ``CpError``,
``ServiceUnavailable``) or ``SegmentsError`` for everything::

    SegmentsError
    ├── InvalidRequest          400, 413, 415, 422: fix the request; repeating it will not help
    │   ├── MalformedJson           400 malformed_json
    │   ├── PayloadTooLarge         413 payload_too_large
    │   ├── UnsupportedMediaType    415 unsupported_media_type
    │   ├── ValidationError         422 validation_error
    │   └── AudienceEmpty           422 audience_empty
    ├── Unauthorized            401 unauthorized
    ├── Forbidden               403 forbidden
    ├── NotFound                404 not_found (no such route)
    │   ├── SegmentNotFound         404 segment_not_found (details["slugs"])
    │   ├── AudienceNotFound        404 audience_not_found
    │   └── PromoNotFound           404 promo_not_found
    ├── Conflict                409
    │   ├── SegmentExists           409 segment_exists
    │   ├── PromoConflict           409 promo_conflict
    │   ├── PromoCancelled          409 promo_cancelled
    │   └── SyncInProgress          409 sync_in_progress (retried by the client)
    ├── ReportLinkError
    │   ├── InvalidLink             403 invalid_link
    │   └── LinkExpired             410 link_expired
    ├── RateLimited             429 rate_limited (retried by the client)
    ├── CpError                 502
    │   ├── CpUnavailable           502 cp_unavailable
    │   └── CpRejected              502 cp_rejected
    └── ServiceUnavailable      503 (retried by the client), a gateway error, no answer
        ├── StorageUnavailable      503 storage_unavailable: nothing changed, for certain
        └── OutcomeUnknown          503 outcome_unknown: the change may or may not be in force

Other answers (405 ``method_not_allowed``, 500 ``internal_error``, ...) raise
``SegmentsError`` itself, with the code the service gave.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "AudienceEmpty",
    "AudienceNotFound",
    "Conflict",
    "CpError",
    "CpRejected",
    "CpUnavailable",
    "Forbidden",
    "InvalidLink",
    "InvalidRequest",
    "LinkExpired",
    "MalformedJson",
    "NotFound",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PromoCancelled",
    "PromoConflict",
    "PromoNotFound",
    "RateLimited",
    "ReportLinkError",
    "SegmentExists",
    "SegmentNotFound",
    "SegmentsError",
    "ServiceUnavailable",
    "StorageUnavailable",
    "SyncInProgress",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationError",
]


class SegmentsError(Exception):
    """An error answer of the segments service, or a failure to reach it.

    ``status`` is the HTTP status, or ``None`` when no answer arrived (``code`` is then
    ``connection_error`` or ``timeout``).  ``code``, ``message`` and ``details`` come from
    the service's ``{"error": {...}}`` body (``http_<status>`` when the answer had none,
    ``invalid_response`` when a success answer could not be read).  ``retry_after_s`` is
    the answer's ``Retry-After`` in seconds, if it had one.
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


class InvalidRequest(SegmentsError):
    """400/413/415/422: the request breaks a rule; repeating it will not help."""


class MalformedJson(InvalidRequest):
    """400 ``malformed_json``: the body is not JSON."""


class PayloadTooLarge(InvalidRequest):
    """413 ``payload_too_large``: the body is over the route's limit (``details["limit"]``)."""


class UnsupportedMediaType(InvalidRequest):
    """415 ``unsupported_media_type``: the body was not sent as ``application/json``."""


class ValidationError(InvalidRequest):
    """422 ``validation_error``: a field breaks a rule; the message says which and where."""


class AudienceEmpty(InvalidRequest):
    """422 ``audience_empty``: syncing an audience without customers."""


class Unauthorized(SegmentsError):
    """401 ``unauthorized``: no token, or one the service does not know."""


class Forbidden(SegmentsError):
    """403 ``forbidden``: the token lacks the scope this route needs
    (``details["required_scope"]``)."""


class NotFound(SegmentsError):
    """404: the base of the "no such thing" errors; raised itself for 404 ``not_found``
    (no such route: a service older than this client)."""


class SegmentNotFound(NotFound):
    """404 ``segment_not_found``: unknown slug(s), all listed in ``details["slugs"]``;
    nothing changed."""


class AudienceNotFound(NotFound):
    """404 ``audience_not_found``: the merchant has no audience of that segment type."""


class PromoNotFound(NotFound):
    """404 ``promo_not_found``: the service knows no promo with this ``promo_id``."""


class Conflict(SegmentsError):
    """409: the base of the conflicts."""


class SegmentExists(Conflict):
    """409 ``segment_exists``: a live segment has that slug."""


class PromoConflict(Conflict):
    """409 ``promo_conflict``: the ``promo_id`` belongs to another merchant audience."""


class PromoCancelled(Conflict):
    """409 ``promo_cancelled``: the promo was cancelled and cannot be synced again."""


class SyncInProgress(Conflict):
    """409 ``sync_in_progress``: another call for this promo is running.

    The client has already retried as ``max_attempts`` allows; ``retry_after_s`` says
    when the service expects the promo to be free.
    """


class ReportLinkError(SegmentsError):
    """A report link that cannot be opened."""


class InvalidLink(ReportLinkError):
    """403 ``invalid_link``: the link was altered (or is not a report link)."""


class LinkExpired(ReportLinkError):
    """410 ``link_expired``: the link is past its expiry; ask for a new one."""


class RateLimited(SegmentsError):
    """429 ``rate_limited``: too many requests; the client's retries ran out."""


class CpError(SegmentsError):
    """502: CP, the downstream targeting service, failed or refused.  Nothing of the
    promo is in force (no customer counted, its CP segment undone); ``promo_status``
    shows it as ``failed``.  Not retried by the client: the service already retried CP
    within the call; syncing the same ``promo_id`` again later is safe."""


class CpUnavailable(CpError):
    """502 ``cp_unavailable``: CP failed, or the sync deadline passed."""


class CpRejected(CpError):
    """502 ``cp_rejected``: CP refused the service's request."""


class ServiceUnavailable(SegmentsError):
    """503, a gateway error (502/504 without the service's error body), a refused or
    dropped connection, or a timeout.  A 503 was already retried as ``max_attempts``
    allows.  After a connection error or a timeout on a write, the change may or may not
    be in force, as after ``OutcomeUnknown``."""


class StorageUnavailable(ServiceUnavailable):
    """503 ``storage_unavailable``: PostgreSQL unreachable or too slow; nothing changed,
    for certain."""


class OutcomeUnknown(ServiceUnavailable):
    """503 ``outcome_unknown``: PostgreSQL failed while the change was being committed: it
    may or may not be in force.  Repeating the same request is safe (the client does, as
    for any 503); note that a repeated ``create_segment`` may then raise
    ``SegmentExists`` and a repeated ``delete_segment`` ``SegmentNotFound`` because the
    first attempt did commit."""


BY_CODE: dict[str, type[SegmentsError]] = {
    "malformed_json": MalformedJson,
    "payload_too_large": PayloadTooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "validation_error": ValidationError,
    "audience_empty": AudienceEmpty,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "segment_not_found": SegmentNotFound,
    "audience_not_found": AudienceNotFound,
    "promo_not_found": PromoNotFound,
    "segment_exists": SegmentExists,
    "promo_conflict": PromoConflict,
    "promo_cancelled": PromoCancelled,
    "sync_in_progress": SyncInProgress,
    "invalid_link": InvalidLink,
    "link_expired": LinkExpired,
    "rate_limited": RateLimited,
    "cp_unavailable": CpUnavailable,
    "cp_rejected": CpRejected,
    "storage_unavailable": StorageUnavailable,
    "outcome_unknown": OutcomeUnknown,
}

# For codes not listed above (a newer service's) with the service's error body.
_BY_STATUS: dict[int, type[SegmentsError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: RateLimited,
    502: CpError,
    503: ServiceUnavailable,
}

# For answers without the service's error body: a proxy or load balancer answered, so
# a 400 or a 404 says nothing about our request's rules or resources.
_BY_STATUS_BARE: dict[int, type[SegmentsError]] = {
    401: Unauthorized,
    403: Forbidden,
    429: RateLimited,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}


class _ErrorInfo(msgspec.Struct):
    code: str
    message: str = ""
    details: dict[str, Any] = {}


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorInfo


_ENVELOPE = msgspec.json.Decoder(_ErrorEnvelope)


def error_from(status: int, raw: bytes, retry_after_s: float | None) -> SegmentsError:
    """The error for a non-2xx answer with body ``raw``."""
    try:
        info: _ErrorInfo | None = _ENVELOPE.decode(raw).error
    except msgspec.DecodeError:  # msgspec.ValidationError is a DecodeError
        info = None
    if info is None:
        message = raw[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
        cls = _BY_STATUS_BARE.get(status, SegmentsError)
        return cls(status, f"http_{status}", message, retry_after_s=retry_after_s)
    cls = BY_CODE.get(info.code) or _BY_STATUS.get(status, SegmentsError)
    return cls(status, info.code, info.message, info.details, retry_after_s=retry_after_s)
