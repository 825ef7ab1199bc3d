"""Specific exceptions of the serving code. Inner code raises these; `service.main` turns each into one JSON error.

Every class carries the HTTP status and the machine-readable `code` it becomes, so the mapping lives in one place.
"""

from __future__ import annotations

from dare_common import DareError


class ServiceError(DareError):
    """Base class: `status` and `code` say how the HTTP layer answers."""

    status: int = 500
    code: str = "internal_error"


class StoreUnavailableError(ServiceError):
    """The sequence store could not be reached, timed out, or refused the command (not the user's fault)."""

    status = 503
    code = "store_unavailable"

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        if timeout:
            self.code = "store_timeout"


class CorruptSequenceError(ServiceError):
    """One user's stored value is not a valid sequence; it is left untouched and only that user is affected."""

    status = 500
    code = "corrupt_sequence"

    def __init__(self, user_id: str, problem: str) -> None:
        # repr: a user id may hold newlines or other control characters, and this message reaches the log.
        super().__init__(
            f"stored sequence of user {user_id!r} is corrupt: {problem}; it was left untouched "
            f"(rewrite it with `dare load` or delete the user's key: the service log names it)"
        )
        self.user_id = user_id


class UnknownModelError(ServiceError):
    status = 404
    code = "unknown_model"


class NoModelLoadedError(ServiceError):
    status = 503
    code = "no_model"


class RequestTimeoutError(ServiceError):
    status = 503
    code = "request_timeout"


class LimitExceededError(ServiceError):
    """A request is well-formed but over a configured limit (candidates, events, history limit)."""

    status = 422
    code = "limit_exceeded"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class InvalidSequenceInput(DareError):
    """Events handed to the store are malformed (wrong dtype, negative ids, ids out of the stored range)."""
