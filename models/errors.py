"""One error type per kind of refusal, shared by the CLI, the HTTP API and the tasks.

Each carries the HTTP status the API answers with and a message that names what
was wrong and what to do. The CLI prints the message on one line and exits 1.
"""

from __future__ import annotations


class ProgressResetError(Exception):
    """Base of every refusal the system makes on purpose."""

    http_status = 400
    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationFailed(ProgressResetError):
    """A value is malformed or out of range."""

    http_status = 422
    code = "validation_failed"


class NothingToReset(ValidationFailed):
    """The reset would reset nobody: no targeted learner has progress in the course (R6)."""

    code = "nothing_to_reset"


class IdempotencyKeyReused(ValidationFailed):
    """An idempotency key sent again with another body (the IETF Idempotency-Key draft answers 422)."""

    code = "idempotency_key_reused"


class NotFound(ProgressResetError):
    """Unknown id, or an object of another organization (never told apart)."""

    http_status = 404
    code = "not_found"


class PermissionDenied(ProgressResetError):
    http_status = 403
    code = "permission_denied"


class Conflict(ProgressResetError):
    """Already being reset, a request with the same idempotency key still in progress, wrong state."""

    http_status = 409
    code = "conflict"


class TokenInvalid(ProgressResetError):
    """Wrong or already used confirmation token."""

    http_status = 409
    code = "token_invalid"


class TokenExpired(ProgressResetError):
    http_status = 410
    code = "token_expired"


class Unauthenticated(ProgressResetError):
    http_status = 401
    code = "unauthenticated"


class UnsupportedMediaType(ProgressResetError):
    """A request body in a format other than JSON."""

    http_status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(ProgressResetError):
    """A dependency (database, broker) cannot be reached."""

    http_status = 503
    code = "unavailable"
