"""Typed async client of the user-segments HTTP API.

Usage::

    async with SegmentsClient("http://user-segments:8080", token="...") as client:
        await client.create_segment("VOICE_MESSAGES")
        await client.update_user_segments(1000, add=["VOICE_MESSAGES"])
        print(await client.get_user_segments(1000))  # ['VOICE_MESSAGES']

Results are msgspec Structs (``models``), errors subclasses of ``SegmentsError``, one
per error code of the API (``errors``); 429 and 503 answers are retried honouring
``Retry-After`` (``client``).
"""

from user_segments_client.client import BATCH_MAX_USERS, VERSION, SegmentsClient
from user_segments_client.errors import (
    AudienceEmpty,
    AudienceNotFound,
    Conflict,
    CpError,
    CpRejected,
    CpUnavailable,
    Forbidden,
    InvalidLink,
    InvalidRequest,
    LinkExpired,
    MalformedJson,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    PromoCancelled,
    PromoConflict,
    PromoNotFound,
    RateLimited,
    ReportLinkError,
    SegmentExists,
    SegmentNotFound,
    SegmentsError,
    ServiceUnavailable,
    StorageUnavailable,
    SyncInProgress,
    Unauthorized,
    UnsupportedMediaType,
    ValidationError,
)
from user_segments_client.models import (
    AddSegment,
    Audience,
    ExplanationSource,
    PromoState,
    PromoStatus,
    ReportLink,
    Rule,
    Segment,
    SegmentExplanation,
    SyncResult,
)

__version__ = VERSION

__all__ = [
    "BATCH_MAX_USERS",
    "AddSegment",
    "Audience",
    "AudienceEmpty",
    "AudienceNotFound",
    "Conflict",
    "CpError",
    "CpRejected",
    "CpUnavailable",
    "ExplanationSource",
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
    "PromoState",
    "PromoStatus",
    "RateLimited",
    "ReportLink",
    "ReportLinkError",
    "Rule",
    "Segment",
    "SegmentExists",
    "SegmentExplanation",
    "SegmentNotFound",
    "SegmentsClient",
    "SegmentsError",
    "ServiceUnavailable",
    "StorageUnavailable",
    "SyncInProgress",
    "SyncResult",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationError",
    "__version__",
]
