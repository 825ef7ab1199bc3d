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


class ExactNumbersRequest(Request):
    """A request whose JSON body keeps what its numbers say: `1.0000000000000001` is not read as the integer 1."""

    async def json(self) -> Any:
        return json.loads(await self.body(), parse_float=exact_number)


class ExactNumbersRoute(APIRoute):
    """The routers' route class: FastAPI's handling, with the body parsed by `ExactNumbersRequest` (the custom
    Request and APIRoute pattern of FastAPI's documentation)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def exact(request: Request) -> Response:
            return await handler(ExactNumbersRequest(request.scope, request.receive))

        return exact
