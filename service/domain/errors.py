"""Domain errors.  Each carries a stable ``code`` that callers can branch on.

The HTTP layer maps codes to statuses; the domain knows nothing about HTTP.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "domain_error"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidRequest(DomainError):
    """The request is well-formed JSON but breaks a rule (overlap, bad expiry, ...)."""

    code = "validation_error"


class SegmentExists(DomainError):
    code = "segment_exists"


class SegmentNotFound(DomainError):
    code = "segment_not_found"


class StorageUnavailable(DomainError):
    """PostgreSQL, the source of truth, could not be reached: nothing was changed."""

    code = "storage_unavailable"


class OutcomeUnknown(StorageUnavailable):
    """PostgreSQL failed while a change was being committed: it may or may not be in
    force.  Retrying the same request is safe (writes are idempotent)."""

    code = "outcome_unknown"


class CacheUnavailable(Exception):
    """Redis could not answer in time.  Never reaches a caller: reads fall back."""


class CpUnavailable(DomainError):
    """The downstream targeting service (CP) failed after retries; nothing was counted."""

    code = "cp_unavailable"


class CpRejected(DomainError):
    """CP refused the request as invalid (a 4xx): retrying the same call cannot help."""

    code = "cp_rejected"
