"""Typed errors, each with its HTTP status. Mapped to responses in exactly one place (service/api/handlers.py).

Messages never contain request bodies, tokens or patient data: ids and short reasons only.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "exception"  # FHIR OperationOutcome issue type

    def __init__(self, message: str = "") -> None:
        text = message or (self.__class__.__doc__ or self.__class__.__name__).strip()
        super().__init__(text)
        self.message = text


class BadRequest(ServiceError):
    """The request is malformed."""

    status_code = 400
    code = "invalid"


class Unauthorized(ServiceError):
    """Authentication failed."""

    status_code = 401
    code = "login"


class NotFound(ServiceError):
    """Not found."""

    status_code = 404
    code = "not-found"


class PayloadTooLarge(ServiceError):
    """The payload is too large."""

    status_code = 413
    code = "too-costly"


class PrefetchUnavailable(ServiceError):
    """Data the rules need could not be obtained (CDS Hooks: 412 Precondition Failed)."""

    status_code = 412
    code = "incomplete"


class InternalError(ServiceError):
    """internal error"""

    status_code = 500
    code = "exception"


class Unavailable(ServiceError):
    """A dependency (database, broker) is unavailable; the caller should retry."""

    status_code = 503
    code = "transient"
