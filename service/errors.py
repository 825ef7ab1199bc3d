"""Specific exceptions of the serving code. Inner code raises these; `service.main` turns each into one JSON error.

Every class carries the HTTP status and the machine-readable `code` it becomes, so the mapping lives in one place.
"""

from __future__ import annotations

from dare_common import DareError

# Every error answer: its `error` code -> (HTTP status, when). The one list that README's API section (the errors
# table), the OpenAPI `responses` (service/api/responses.py) and tests/service/test_error_contract.py (which
# provokes each one end to end) follow. Every body is {"error", "detail", "request_id", "fields"?}, except the two
# that `dare serve` answers before a request reaches the app (408, 431: {"error", "detail"}, connection closed).
ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "the body is not JSON: malformed, not UTF-8, compressed, nested too deeply"),
    "bad_request": (400, "Content-Length is not an integer"),
    "unauthorized": (401, "a token is configured and the `Authorization: Bearer` header is missing or wrong"),
    "not_found": (404, "no such path"),
    "unknown_model": (404, "`model` names no loaded model"),
    "method_not_allowed": (405, "the path does not take this method (`Allow` lists those it takes)"),
    "client_timeout": (408, "`dare serve`: the request was not sent completely within `DARE_CLIENT_TIMEOUT_S`"),
    "body_too_large": (413, "body over `DARE_MAX_BODY_BYTES` (by Content-Length or by bytes received)"),
    "unsupported_media_type": (415, "a body route without `Content-Type: application/json` (charset utf-8, if "
                               "given), or with a `Content-Encoding`"),
    "invalid_request": (422, "schema errors (`fields` names each one, e.g. `candidates.3.item_id`), unknown body "
                        "fields, a malformed `X-Request-ID` or `Idempotency-Key`"),
    "limit_exceeded": (422, "over `DARE_MAX_CANDIDATES`, `DARE_MAX_EVENTS_PER_REQUEST`, `DARE_MAX_HISTORY` or "
                       "`DARE_MAX_USER_ID_LENGTH`"),
    "headers_too_large": (431, "`dare serve`: headers over `DARE_MAX_HEADER_BYTES`"),
    "corrupt_sequence": (500, "this user's stored value is not a valid sequence (left untouched; other users "
                         "unaffected)"),
    "internal_error": (500, "a bug: the service log has the traceback"),
    "store_unavailable": (503, "the store is down (the service recovers by itself)"),
    "store_timeout": (503, "the store is slower than `DARE_REDIS_SOCKET_TIMEOUT_S`"),
    "request_timeout": (503, "the call, queueing included, took longer than `DARE_REQUEST_TIMEOUT_S`"),
    "no_model": (503, "no model is loaded, or the configured default is not"),
}


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


class MalformedBodyError(ServiceError):
    """The request body cannot be read as JSON at all (before any schema check)."""

    status = 400
    code = "invalid_json"


class UnsupportedMediaTypeError(ServiceError):
    status = 415
    code = "unsupported_media_type"


class InvalidSequenceInput(DareError):
    """Events handed to the store are malformed (wrong dtype, negative ids, ids out of the stored range)."""
