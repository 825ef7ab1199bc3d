"""JSON responses rendered with orjson (numpy arrays serialised directly) and the error bodies' OpenAPI entries."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.responses import JSONResponse

from service.errors import LimitExceededError, ServiceError
from service.schemas import ErrorBody

log = logging.getLogger("service")
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class OrjsonResponse(JSONResponse):
    """application/json via orjson: several times faster than the stdlib and takes float32 arrays as they are."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=JSON_OPTIONS)


def error_response(status: int, code: str, detail: str, *, fields: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> OrjsonResponse:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if fields is not None:
        body["fields"] = fields
    return OrjsonResponse(body, status_code=status, headers=headers)


def service_error_response(exc: ServiceError, method: str, path: str) -> OrjsonResponse:
    """The JSON answer to one of the service's errors (its status and code); server-side ones are logged."""
    if isinstance(exc, LimitExceededError):
        return error_response(exc.status, exc.code, str(exc), fields=[{"field": exc.field, "message": exc.detail}])
    if exc.status >= 500:
        log.warning("%s %s -> %d %s: %s", method, path, exc.status, exc.code, exc)
    return error_response(exc.status, exc.code, str(exc))


_DESCRIPTIONS = {
    400: "The body could not be read at all (not UTF-8, bad Content-Length)",
    401: "Missing or wrong bearer token (only when DARE_API_TOKEN / DARE_ADMIN_TOKEN is set)",
    404: "Unknown model",
    413: "Request body larger than DARE_MAX_BODY_BYTES",
    422: "Invalid request: `fields` names each offending field",
    500: "A stored sequence of this user is corrupt (error `corrupt_sequence`)",
    503: "Store unavailable or slow (store_unavailable, store_timeout), request timeout, or no model loaded",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these error statuses, all with the ErrorBody schema."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}
