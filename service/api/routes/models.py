"""GET /models and POST /admin/reload."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter

from service.api.deps import AdminAuth, ServicesDep
from service.api.responses import errors
from service.schemas import ModelInfo, ModelsResponse, ReloadResponse

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="The loaded models and their manifests' key facts")
async def list_models(services: ServicesDep) -> ModelsResponse:
    current = services.registry.current
    split = current.routing.split
    return ModelsResponse(
        default=current.default,
        models=[ModelInfo(**m.info(default=name == current.default)) for name, m in sorted(current.models.items())],
        traffic_split=split.as_dict() if split else None,
        shadow_model=current.routing.shadow,
    )


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses=errors(401),
    dependencies=[AdminAuth],
    summary="Load new or changed model folders and swap them in atomically (also: SIGHUP)",
)
async def reload_models(services: ServicesDep) -> ReloadResponse:
    # Loading sessions blocks for a while; not under the request timeout (an admin call, not the hot path).
    report = await anyio.to_thread.run_sync(services.registry.reload)
    return ReloadResponse(
        loaded=report.loaded,
        unchanged=report.unchanged,
        removed=report.removed,
        rejected=report.rejected,
        default=report.default,
        traffic_split=report.routing.split.as_dict() if report.routing.split else None,
        shadow_model=report.routing.shadow,
        traffic_error=report.traffic_error,
    )
