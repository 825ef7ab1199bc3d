"""Typed dependency aliases for the routes: the app's services, settings, and bearer-token checks."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.core.config import Settings
from service.engine import ScoringEngine
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.store import SequenceStore


@dataclass
class Services:
    """Everything the routes need, built in the app's lifespan."""

    settings: Settings
    store: SequenceStore
    registry: ModelRegistry
    engine: ScoringEngine
    metrics: ServiceMetrics
    limiter: anyio.CapacityLimiter  # bounds concurrent blocking work (scoring, store calls) per process


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.services.settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]

_bearer = HTTPBearer(auto_error=False, description="DARE_API_TOKEN (DARE_ADMIN_TOKEN for /admin) when configured")
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check(credentials: HTTPAuthorizationCredentials | None, token: SecretStr | None) -> None:
    if token is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    # Constant-time comparison so the answer time does not leak how much of the token matched.
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token (send `Authorization: Bearer <token>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_api_token(credentials: CredentialsDep, settings: SettingsDep) -> None:
    _check(credentials, settings.api_token)


def require_admin_token(credentials: CredentialsDep, settings: SettingsDep) -> None:
    _check(credentials, settings.effective_admin_token)


ApiAuth = Depends(require_api_token)
AdminAuth = Depends(require_admin_token)
