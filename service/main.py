"""`create_app(settings)`: the FastAPI scoring service.

The lifespan connects the sequence store (or starts the embedded one), loads every model folder, and wires the
reload triggers (POST /admin/reload, SIGHUP, and the optional polling watcher). Errors become JSON responses in one
place (`_install_error_handlers`): every service exception carries its status and code, validation errors name
their fields.

Run it with `dare serve`, or `uvicorn --factory service.main:create_app` (settings from DARE_* variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi_offline import FastAPIOffline
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

import dare_common
from dare_common import DareError
from service.api.concurrency import BlockingPool
from service.api.deps import Services, require_admin_token, require_api_token
from service.api.middleware import BodySizeLimit, RequestMetrics
from service.api.request_id import HEADER as REQUEST_ID_HEADER
from service.api.request_id import RequestIdFilter, RequestIdMiddleware, current_request_id
from service.api.responses import OrjsonResponse, error_response, service_error_response
from service.api.routes import health, models, scoring, users
from service.api.routes.users import default_history_limit
from service.core.config import Settings, get_settings
from service.engine import ScoringEngine
from service.errors import InvalidSequenceInput, ServiceError
from service.logs import configure_json_logging
from service.metrics import PROCESS_SAMPLE_INTERVAL_S, ServiceMetrics, multiprocess_dir
from service.registry import InferenceOptions, ModelRegistry, ModelSet
from service.search import FusedSearch, kernel_isa
from service.tracing import Tracing, fastapi_telemetry, tracer_provider_from_env, tracing_requested
from service.traffic import ShadowScorer, routing_source

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("service")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def search_label(fused: FusedSearch | None) -> str:
    """dare_model_info's `search` label: which code searches this model's long histories."""
    if fused is None:
        return "onnx"
    return {512: "avx512", 256: "avx2"}.get(fused.isa or kernel_isa(), "onnx")


def build_services(settings: Settings, metrics: ServiceMetrics, blocking: BlockingPool, tracing: Tracing | None = None) -> Services:
    """Connect the store and load the models (blocking; called from the lifespan in a thread)."""
    from service.store import SequenceStore

    store = SequenceStore.from_url(
        settings.redis_url,
        data_dir=settings.data_dir,
        key_prefix=settings.key_prefix,
        lifelong_max_events=settings.lifelong_max_events,
        connect_timeout_s=settings.redis_connect_timeout_s,
        socket_timeout_s=settings.redis_socket_timeout_s,
        max_connections=settings.redis_max_connections,
        metrics=metrics,
    )

    def publish(models: ModelSet) -> None:
        metrics.set_models([
            (m.name, m.manifest.version, m.manifest.model_kind, str(m.manifest.att_dim), str(m.manifest.repr_dim),
             str(m.manifest.top_k), str(m.name == models.default).lower(), search_label(m.fused))
            for m in models.models.values()
        ])  # fmt: skip

    registry = ModelRegistry(
        settings.models_dir,
        InferenceOptions(
            settings.ort_intra_op_threads, settings.ort_inter_op_threads, settings.ort_graph_optimization, settings.search_kernel,
            settings.search_precision,
        ),
        default_model=settings.default_model,
        verify_hashes=settings.verify_model_hashes,
        on_change=publish,
        routing=routing_source(settings.models_dir, settings.traffic_split, settings.shadow_model),
    )
    if not settings.models_dir.is_dir():
        log.warning("models dir %s does not exist: no model loaded, /readyz is false", settings.models_dir)
    report = registry.reload()
    engine = ScoringEngine(
        store,
        registry,
        max_history=settings.max_history,
        degraded_on_store_error=settings.degraded_on_store_error,
        metrics=metrics,
        search_threads=settings.search_threads,
    )
    log.info(
        "store: %s; models loaded: %s (default %s), rejected: %s; traffic: %s; auth: %s",
        store.description,
        ", ".join(report.loaded) or "none",
        report.default,
        ", ".join(report.rejected) or "none",
        report.routing.describe(),
        "bearer token required" if settings.api_token else "open (DARE_API_TOKEN not set)",
    )
    return Services(settings=settings, store=store, registry=registry, engine=engine, metrics=metrics, blocking=blocking,
                    shadow=ShadowScorer(blocking, metrics), tracing=tracing)  # fmt: skip


async def _reload(services: Services, why: str) -> None:
    log.info("reloading models (%s)", why)
    report = await anyio.to_thread.run_sync(services.registry.reload)
    log.info("reload done: loaded %s, unchanged %s, removed %s, rejected %s; traffic: %s",
             report.loaded, report.unchanged, report.removed, list(report.rejected), report.routing.describe())


async def _watch(services: Services, interval: float) -> None:
    """Polling watcher (DARE_RELOAD_INTERVAL_S > 0): reload when a folder is added, removed or its manifest changes."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await anyio.to_thread.run_sync(services.registry.changed):
                await _reload(services, "models dir changed")
        except Exception:  # keep watching whatever one round did
            log.exception("model watcher round failed")


def _install_sighup(services: Services) -> bool:
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(services, "SIGHUP")))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False  # not the main thread (e.g. TestClient) or no SIGHUP on this platform
    return True


def _field(loc: tuple[object, ...] | list[object]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts[:1]
    return ".".join(parts) or "body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> OrjsonResponse:
        return service_error_response(exc, request.method, request.url.path)

    @app.exception_handler(InvalidSequenceInput)
    async def invalid_sequence(request: Request, exc: InvalidSequenceInput) -> OrjsonResponse:
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> OrjsonResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):  # FastAPI's own parse (routes without a body)
            return error_response(400, "invalid_json", "the body is not valid JSON")
        fields = []
        for err in exc.errors():
            kind = err.get("type")
            name = _field(err.get("loc", ()))
            msg = str(err.get("msg", "invalid"))
            if kind == "missing" and name == "body":
                msg = "a JSON body is required"
            elif kind == "extra_forbidden":
                msg = "unknown field (the schema at /openapi.json lists the accepted ones)"
            elif kind in ("model_attributes_type", "dict_type") and name == "body":
                msg = f"{msg} (send a JSON object with Content-Type: application/json)"
            fields.append({"field": name, "message": msg})
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
        return error_response(422, "invalid_request", detail, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> OrjsonResponse:
        log.exception("unhandled error on %s %r", request.method, request.url.path)  # %r: the path is the client's
        # Answered outside RequestIdMiddleware (Starlette's outermost error middleware): the header is set here.
        response = error_response(500, "internal_error", "internal error (see the service log)")
        response.headers[REQUEST_ID_HEADER] = current_request_id()
        return response


def _apply_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Write the configured limits into the document, so it describes exactly what this service accepts."""
    components = schema.get("components", {}).get("schemas", {})
    user_id_max = {"maxLength": settings.max_user_id_length}
    for name, field, limits in (
        ("ScoreRequest", "candidates", {"maxItems": settings.max_candidates}),
        ("ScoreRequest", "user_id", user_id_max),
        ("EventsRequest", "events", {"maxItems": settings.max_events_per_request}),
        ("EventsRequest", "user_id", user_id_max),
    ):
        prop = components.get(name, {}).get("properties", {}).get(field)
        if prop is not None:
            prop.update(limits)
    history = schema.get("paths", {}).get("/users/{user_id}/history", {}).get("get", {})
    for param in history.get("parameters", []):
        if param.get("name") == "user_id":
            param["schema"].update(user_id_max)
        elif param.get("name") == "limit":
            # An integer (never null: the route takes a missing limit as the default) within the configured maximum.
            param["schema"] = {"type": "integer", "minimum": 0, "maximum": settings.max_history,
                               "default": default_history_limit(settings.max_history), "title": "Limit"}  # fmt: skip


def _openapi(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, declaring bearer auth on exactly the operations that require it under these settings."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        guarded: dict[Callable[..., None], SecretStr | None] = {
            require_api_token: settings.api_token,
            require_admin_token: settings.effective_admin_token,
        }
        # iter_route_contexts also walks included routers: app.routes holds them as wrappers, not APIRoutes.
        for context in iter_route_contexts(app.routes):
            route = context.original_route
            if not isinstance(route, APIRoute):
                continue
            needs = any(guarded.get(dep.dependency) is not None for dep in route.dependencies)  # type: ignore[call-overload]
            if needs:
                for method in route.methods or ():
                    schema["paths"][context.path_format][method.lower()]["security"] = [{"bearer": []}]
        _apply_limits(schema, settings)
        if settings.api_token is not None or settings.effective_admin_token is not None:
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    return build


async def _sample_process(metrics: ServiceMetrics) -> None:
    """Multiprocess mode: copy this worker's process and GC figures into the shared metrics now and then."""
    while True:
        metrics.sample_process()
        await asyncio.sleep(PROCESS_SAMPLE_INTERVAL_S)


def create_app(settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The app; `settings` default to the DARE_* environment (read now, not at import). Traces go to
    `tracer_provider` (an OpenTelemetry TracerProvider) when given, else to one built from the OTEL_* variables
    when tracing is on (service/tracing.py)."""
    settings = settings if settings is not None else get_settings()
    metrics = ServiceMetrics()
    tracing = None
    if tracer_provider is not None:
        tracing = Tracing(tracer_provider, owned=False)
    elif tracing_requested(settings):
        tracing = Tracing(tracer_provider_from_env(), owned=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        blocking = BlockingPool(settings.scoring_threads, settings.request_timeout_s, metrics)
        services = await anyio.to_thread.run_sync(build_services, settings, metrics, blocking, tracing)
        app.state.services = services
        sighup = _install_sighup(services)
        tasks = []
        if settings.reload_interval_s > 0:
            tasks.append(asyncio.get_running_loop().create_task(_watch(services, settings.reload_interval_s)))
        if multiprocess_dir():
            tasks.append(asyncio.get_running_loop().create_task(_sample_process(metrics)))
        # What startup built (models, app, libraries: ~94,000 objects) lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it (45 ms -> under 1 ms; such a pause stalled the
        # requests in flight: docs/loadtest.md, the long workload's fixed load).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if tracing is not None:
                tracing.shutdown()
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            services.store.close()
            services.blocking.shutdown()
            services.engine.splitter.shutdown()
            if multiprocess_dir():
                # Drop this worker's live gauges (dare_model_info) from the aggregated /metrics.
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())

    # FastAPI's self-hosted docs (docs_url=None + get_swagger_ui_html/get_redoc_html on local assets), packaged:
    # /docs and /redoc load Swagger UI and ReDoc from /static-offline-docs, so they work without internet.
    app = FastAPIOffline(
        title="DARE scoring service",
        summary="CTR scores over lifelong behaviour sequences (DARE: decoupled attention and representation embeddings)",
        version=dare_common.__version__,
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
        telemetry=fastapi_telemetry(tracing),  # FastAPI's OpenTelemetry support: request spans when tracing is on
    )
    for router in (scoring.router, users.router, models.router, health.router):
        app.include_router(router)
    app.openapi = _openapi(app, settings)  # type: ignore[method-assign]
    _install_error_handlers(app)
    # Added last = outermost: the duration histogram also sees the 413s of the body limit (under their route).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, routes=app.router.routes)
    app.add_middleware(RequestMetrics, metrics=metrics, access_log=settings.log_format == "json")
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer and log line of a request has its id
    return app


def create_app_from_env() -> FastAPI:
    """The uvicorn factory of `dare serve`: settings from DARE_* variables, and the service's log lines shown."""
    settings = get_settings()
    if settings.log_format == "json":
        configure_json_logging(settings.log_level)  # the request id too, from RequestIdFilter
    else:
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")  # fmt: skip
        install_request_id_logging()
    try:
        return create_app(settings)
    except DareError as exc:  # e.g. tracing on without the otel extra: one line, not a traceback
        log.error("%s", exc)
        raise SystemExit(2) from None


def install_request_id_logging() -> None:
    """The request id on every log line: `RequestIdFilter` on the root handlers and on uvicorn's access log, whose
    lines end in `[<request id>]`."""
    from uvicorn.logging import AccessFormatter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    for handler in logging.getLogger("uvicorn.access").handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(AccessFormatter('%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s '
                                             "[%(request_id)s]"))  # fmt: skip
