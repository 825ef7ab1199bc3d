"""Typed dependency aliases for the routes: the app's services, settings, and bearer-token checks.

The token checks read the Authorization header themselves rather than through FastAPI's HTTPBearer, so the
OpenAPI document declares bearer auth only when a token is configured (see `service.main._openapi`)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from pydantic import SecretStr

from service.api.concurrency import BlockingPool
from service.core.config import Settings
from service.engine import ScoringEngine
from service.errors import MalformedBodyError, UnsupportedMediaTypeError
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.schemas import exact_number
from service.store import SequenceStore

if TYPE_CHECKING:
    from service.tracing import Tracing
    from service.traffic import ShadowScorer


@dataclass
class Services:
    """Everything the routes need, built in the app's lifespan."""

    settings: Settings
    store: SequenceStore
    registry: ModelRegistry
    engine: ScoringEngine
    metrics: ServiceMetrics
    blocking: BlockingPool  # bounds concurrent blocking work (scoring, store calls) per process
    shadow: ShadowScorer | None = None  # shadow scoring (service/traffic.py)
    tracing: Tracing | None = None  # OpenTelemetry, when on (service/tracing.py)


async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.services.settings


# Every dependency here is `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, one
# thread hop per dependency per request (~0.1-0.5 ms each on a busy 2-core machine; see docs/performance.md).
ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def bearer_matches(authorization: str, token: SecretStr) -> bool:
    """Whether an Authorization header value presents `token` as a bearer token."""
    scheme, _, given = authorization.partition(" ")
    presented = given.strip().encode() if scheme.lower() == "bearer" else b""
    # Constant-time comparison so the answer time does not leak how much of the token matched.
    return hmac.compare_digest(presented, token.get_secret_value().encode())


def _check(request: Request, token: SecretStr | None) -> None:
    if token is not None and not bearer_matches(request.headers.get("authorization", ""), token):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token (send `Authorization: Bearer <token>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_api_token(request: Request, settings: SettingsDep) -> None:
    _check(request, settings.api_token)


async def require_admin_token(request: Request, settings: SettingsDep) -> None:
    _check(request, settings.effective_admin_token)


ApiAuth = Depends(require_api_token)
AdminAuth = Depends(require_admin_token)


_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_UNREAD = object()
_JSON_REQUIRED = "send the body as JSON with `Content-Type: application/json`"


def check_json_content_type(content_type: str | None, content_encoding: str | None) -> None:
    """UnsupportedMediaTypeError unless the headers declare an uncompressed JSON body: `application/json` or
    `application/<something>+json`, with `charset=utf-8` if a charset is given."""
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {content_encoding[:40]!r} is not supported: send the body uncompressed"
        )
    if content_type is None:
        raise UnsupportedMediaTypeError(f"the request has no Content-Type: {_JSON_REQUIRED}")
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise UnsupportedMediaTypeError(f"Content-Type {content_type[:60]!r} is not JSON: {_JSON_REQUIRED}")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaTypeError(f"charset {value.strip()[:40]!r} is not supported: JSON bodies are UTF-8")


def parse_json_body(body: bytes) -> Any:
    """The body as JSON, numbers read exactly (`exact_number`); MalformedBodyError saying in words what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        if body[:2] == b"\x1f\x8b":
            raise MalformedBodyError("the body is gzip-compressed: send it uncompressed (no Content-Encoding)") from None
        raise MalformedBodyError(f"the body is not UTF-8 (byte {exc.start} is 0x{body[exc.start]:02x})") from None
    try:
        return json.loads(text, parse_float=exact_number)
    except json.JSONDecodeError as exc:
        raise MalformedBodyError(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (Python's int conversion limit)
        raise MalformedBodyError(f"the body is not valid JSON here: {exc}") from None
    except RecursionError:
        raise MalformedBodyError("the body is not valid JSON here: it nests arrays or objects too deeply") from None


class ExactNumbersRequest(Request):
    """A request whose JSON body keeps what its numbers say: `1.0000000000000001` is not read as the integer 1."""

    document: Any = _UNREAD

    async def json(self) -> Any:
        if self.document is _UNREAD:
            self.document = parse_json_body(await self.body())
        return self.document


class ExactNumbersRoute(APIRoute):
    """The routers' route class: FastAPI's handling, with the body parsed by `ExactNumbersRequest` (the custom
    Request and APIRoute pattern of FastAPI's documentation). A body route first checks the content type (415)
    and parses the body (400 `invalid_json`), so neither reaches the schema validation as a 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def exact(request: Request) -> Response:
            exact_request = ExactNumbersRequest(request.scope, request.receive)
            if request.method in _BODY_METHODS:
                headers = request.headers
                check_json_content_type(headers.get("content-type"), headers.get("content-encoding"))
                if await exact_request.body():
                    await exact_request.json()
            return await handler(exact_request)

        return exact
