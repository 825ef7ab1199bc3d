"""OpenTelemetry tracing of the HTTP requests, off by default (docs/operations.md).

On with DARE_OTEL=1, or when one of the standard variables OTEL_TRACES_EXPORTER (other than `none`),
OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; OTEL_SDK_DISABLED=true keeps it off. The
exporters are the standard OTEL_TRACES_EXPORTER list (default `otlp`: OTLP over HTTP/protobuf, or gRPC when
OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL=grpc and opentelemetry-exporter-otlp-proto-grpc is installed; `console`;
`none`), each behind a BatchSpanProcessor; the exporters, the batch processor and the sampler read their own OTEL_*
variables (endpoint, headers, timeouts, OTEL_TRACES_SAMPLER, ...), and the resource reads OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES (service.name defaults to `dare-scoring`).

Each HTTP request (but the scrapes and probes /metrics, /healthz, /readyz) is one SERVER span named
`METHOD /route/template`, made by FastAPI's own OpenTelemetry support, which continues the caller's trace when it
sends a W3C `traceparent` (the propagators of OTEL_PROPAGATORS: by default tracecontext and baggage). A POST /score span
gets the attributes dare.model, dare.model_version, dare.routed_by, dare.history_length, dare.stored_length,
dare.candidates, dare.degraded and one child span per stage (store_fetch, id_mapping, search, scoring), made after
the call from the engine's own stage timings with explicit start and end times: nothing is added to the scoring
path itself. The SDK and the exporters (the `otel` extra) are imported only when tracing is on (FastAPI itself
depends on the OpenTelemetry API, not on the SDK).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi.telemetry import TelemetryConfig

import dare_common
from dare_common import DareError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from service.core.config import Settings
    from service.engine import ScoreResult

SERVICE_NAME = "dare-scoring"
UNTRACED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})  # scrapes and probes: no traces
STAGE_ORDER = ("store_fetch", "id_mapping", "search", "scoring")


def tracing_requested(settings: Settings, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on under these settings and OTEL_* variables (module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if settings.otel:
        return True
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _import_sdk() -> None:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise DareError(
            "tracing is on (DARE_OTEL or OTEL_* variables) but the OpenTelemetry SDK is not installed: "
            "pip install 'dare-ctr[otel]', or unset DARE_OTEL and the OTEL_* variables"
        ) from None


def tracer_provider_from_env() -> TracerProvider:
    """A TracerProvider with the exporters of OTEL_TRACES_EXPORTER (module docstring); DareError names a bad value."""
    _import_sdk()
    environ = os.environ
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attributes: dict[str, str] = {"service.version": dare_common.__version__}
    if not environ.get("OTEL_SERVICE_NAME") and "service.name=" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    for name in names or ["otlp"]:
        exporter: SpanExporter
        if name == "none":
            continue
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
            ).strip()
            if protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                exporter = HttpExporter()
            elif protocol == "grpc":
                try:
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
                except ImportError:
                    raise DareError(
                        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc "
                        "(pip install it, or use http/protobuf, the default)"
                    ) from None
                exporter = GrpcExporter()
            else:
                raise DareError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
        else:
            raise DareError(f"OTEL_TRACES_EXPORTER: {name!r} is not supported (otlp, console or none)")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """The app's tracer provider: FastAPI's own OpenTelemetry support (`FastAPI(telemetry=...)`) makes the request
    spans with it, and `score_spans` the stage spans of POST /score."""

    def __init__(self, provider: TracerProvider, *, owned: bool) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.owned = owned  # built here from the environment: shut down (flushed) with the app
        self.tracer = provider.get_tracer("dare.service", dare_common.__version__)
        self.trace = trace

    def score_spans(self, result: ScoreResult, routed_by: str) -> None:
        """On the current (request) span: the call's attributes and one child span per stage, from its timings."""
        span = self.trace.get_current_span()
        if not span.is_recording():
            return
        model = result.model
        span.set_attributes({
            "dare.model": model.name,
            "dare.model_version": model.manifest.version,
            "dare.routed_by": routed_by,
            "dare.history_length": len(result.history),
            "dare.stored_length": result.stored_length,
            "dare.candidates": len(result.probs),
            "dare.degraded": result.degraded,
        })  # fmt: skip
        parent = self.trace.set_span_in_context(span)
        start = result.started_ns
        for stage in STAGE_ORDER:
            seconds = result.timings.get(stage)
            if seconds is None:
                continue
            end = start + int(seconds * 1e9)
            child = self.tracer.start_span(stage, context=parent, start_time=start, attributes={"dare.model": model.name})
            child.end(end_time=end)
            start = end

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()


def fastapi_telemetry(tracing: Tracing | None) -> TelemetryConfig:
    """FastAPI's `telemetry=` settings (its TelemetryConfig): with tracing, its request spans on our provider, no
    per-operation spans, no OpenTelemetry metrics or logs (Prometheus and the log lines cover those), scrapes and
    probes untraced; without, all of it off (not even a look at OpenTelemetry's global providers per request)."""
    off: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False, "auto_configure": False}
    if tracing is None:
        return off
    return {**off, "tracing": True, "tracer_provider": tracing.provider,
            "exclude": lambda scope: scope.get("path") in UNTRACED_PATHS}  # fmt: skip


def check_tracing(settings: Settings) -> bool:
    """`dare serve`'s check before it starts: when tracing is on, the SDK is installed and the OTEL_* exporter
    settings are usable (DareError otherwise). Whether tracing is on."""
    if not tracing_requested(settings):
        return False
    tracer_provider_from_env().shutdown()
    return True
