"""Every setting of the scoring service, in one pydantic-settings `Settings` read from `DARE_*` variables.

Settings are built by `get_settings()` (cached) or passed to `create_app(settings)`; nothing reads the
environment at import time, so tests and the CLI can build as many differently configured apps as they need.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dare_common import DareError

DEFAULT_SEARCH_THREADS = 2  # DARE_SEARCH_THREADS: the 2 cores this service is measured on

GraphOptimization = Literal["disable", "basic", "extended", "all"]


class Settings(BaseSettings):
    """The service's configuration. Every field is also the environment variable `DARE_<FIELD>` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="DARE_", extra="ignore", frozen=True)

    # --- models -------------------------------------------------------------------------------------------------
    models_dir: Path = Field(Path("models"), description="folder whose subfolders are model folders (one per model)")
    default_model: str | None = Field(None, description="model used when a request names none; default: first by name")
    verify_model_hashes: bool = Field(True, description="check every file's sha256 against the manifest on load")
    reload_interval_s: float = Field(
        0.0, ge=0.0, description="poll the models dir for new/changed folders every this many seconds (0 = off)"
    )
    traffic_split: str | None = Field(
        None,
        description="route /score requests naming no model by a stable hash of the user id, e.g. "
        "`dare-att16=90,dare-att64=10` (relative weights); `traffic.json` in the models dir, when present, wins and "
        "is re-read on every reload (docs/operations.md)",
    )
    shadow_model: str | None = Field(
        None, description="also score each /score request with this model after answering, in an idle worker; "
        "the difference is metered, never returned",
    )

    # --- sequence store -----------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="redis://, rediss:// (TLS), unix:// or redis+cluster://host:port; unset = an embedded redis-server in data_dir",
    )
    data_dir: Path = Field(Path("var"), description="where the embedded Redis keeps its data file")
    key_prefix: str = Field("dare", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Redis key prefix")
    redis_connect_timeout_s: float = Field(0.5, gt=0.0, description="socket connect timeout to the store")
    redis_socket_timeout_s: float = Field(0.5, gt=0.0, description="socket read/write timeout to the store")
    redis_max_connections: int = Field(64, ge=1, description="connection pool size per process")
    lifelong_max_events: int = Field(100_000, ge=1, description="a user's stored sequence is trimmed to this")
    max_history: int = Field(100_000, ge=0, description="most recent events read from the store per request")
    degraded_on_store_error: bool = Field(
        False, description="store down: score from an empty history flagged degraded instead of answering 503"
    )

    # --- request limits -----------------------------------------------------------------------------------------
    max_candidates: int = Field(1_000, ge=1, description="candidates per /score request")
    max_events_per_request: int = Field(10_000, ge=1, description="events per /events request")
    idempotency_ttl_s: int = Field(
        600, ge=1, le=7 * 86400, description="how long POST /events remembers a user's Idempotency-Key (seconds)"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies larger than this get 413")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="`dare serve`: a request whose headers are larger gets 431 and is disconnected"
    )
    client_timeout_s: float = Field(
        10.0, gt=0.0, description="`dare serve`: a client that has not sent its whole request this many seconds after "
        "its first byte gets 408 and is disconnected (the headers, then the Content-Length bytes of the body)",
    )
    max_user_id_length: int = Field(128, ge=1, le=1024, description="characters in a user id")
    request_timeout_s: float = Field(2.0, gt=0.0, description="a /score or /events call answers 503 after this")

    # --- security -----------------------------------------------------------------------------------------------
    api_token: SecretStr | None = Field(
        None, description="when set, /score, /events, /users and /admin require `Authorization: Bearer <token>`"
    )
    admin_token: SecretStr | None = Field(None, description="token for /admin/* (defaults to api_token)")

    # --- inference ----------------------------------------------------------------------------------------------
    ort_intra_op_threads: int = Field(1, ge=0, description="onnxruntime threads inside one operator (0 = ORT default)")
    ort_inter_op_threads: int = Field(1, ge=0, description="onnxruntime threads across operators (0 = ORT default)")
    ort_graph_optimization: GraphOptimization = Field("all", description="onnxruntime graph optimisation level")
    search_kernel: Literal["auto", "fused", "onnx"] = Field(
        "auto",
        description="auto: the fused search kernel (service/search.py) for histories of at least 10 x top-K events "
        "where the model folder, the build and the CPU (AVX-512F) allow it, else search.onnx; fused: the same, and "
        "with AVX2 + FMA on a CPU without AVX-512F (not measured on such a CPU: measure first); onnx: always search.onnx",
    )
    search_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the fused kernel's pass 1 (block maxima): auto = bfloat16 where the CPU has AVX-512 BF16 and it "
        "measures at least 1.1x as fast as float32 when the model loads, else float32; pass 2 rescores in float32 "
        "whatever this is, so the answers are the float32 kernel's",
    )
    scoring_threads: int = Field(4, ge=1, description="scoring calls running at once per process (the rest queue)")
    search_threads: int = Field(
        DEFAULT_SEARCH_THREADS, ge=1, description="threads one long fused search (history x candidates >= 2M) may use while it is the only "
        "search of this process, each on a CPU of its own where the process may use that many (the extra threads "
        "are pinned to the last ones); 1 = never split",
    )

    # --- server (used by `dare serve`) --------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line, and an access line per request (docs/operations.md)"
    )

    # --- tracing ------------------------------------------------------------------------------------------------
    otel: bool = Field(
        False, description="OpenTelemetry traces (needs the `otel` extra); also on when OTEL_TRACES_EXPORTER or "
        "OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set; the exporter is configured by the standard OTEL_* variables",
    )

    @field_validator("api_token", "admin_token")
    @classmethod
    def _non_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty variable (DARE_API_TOKEN=) means "no token", not "the empty token".
        if value is not None and not value.get_secret_value():
            return None
        return value

    @field_validator("traffic_split", "shadow_model")
    @classmethod
    def _traffic(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None  # an empty variable means "none"
        if info.field_name == "traffic_split":
            from service.traffic import TrafficConfigError, TrafficSplit

            try:
                TrafficSplit.parse(value, where="split")
            except TrafficConfigError as exc:
                raise ValueError(str(exc).removeprefix("split: ")) from None
        return value.strip()

    @property
    def effective_admin_token(self) -> SecretStr | None:
        return self.admin_token or self.api_token


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment plus explicit overrides; a bad value is a DareError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"DARE_{str(e['loc'][0]).upper() if e['loc'] else '?'}: {e['msg']}" for e in exc.errors()
        )
        raise DareError(f"invalid service settings: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings, built on first use (never at import)."""
    return load_settings()
