"""GET /healthz (the process answers), GET /readyz (store reachable and a model loaded), GET /metrics.

These three are open (no token): they say nothing about where the store is or how keys are laid out."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from service.api.deps import ServicesDep
from service.api.responses import OrjsonResponse
from service.errors import ServiceError
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers (HEAD too)")
async def healthz() -> Health:
    return Health(status="ok")


# HEAD /healthz and HEAD /readyz: the same status, no body (load balancers and `curl -I` probe with HEAD). Separate
# routes out of the schema: one route with both methods would give the OpenAPI document two operations of one id.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: store unreachable or no model loaded"}},
    summary="Readiness: the store answers and at least one model is loaded (HEAD too)",
)
async def readyz(services: ServicesDep) -> OrjsonResponse:
    try:
        await services.blocking.run(services.store.ping, what="store ping")
        store = "ok"
    except ServiceError:
        store = "unavailable"  # the reason (which may name the store's address) is in the service log only
    models = len(services.registry.current.models)
    ready = store == "ok" and models > 0
    body = Readiness(ready=ready, store=store, models=models).model_dump()
    return OrjsonResponse(body, status_code=200 if ready else 503)


router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
