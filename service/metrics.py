"""Prometheus metrics of the scoring service (prometheus-client).

Each app owns a `ServiceMetrics` with its own registry, so several apps in one process (tests) do not collide.
With several worker processes (`dare serve --workers N`) prometheus-client's multiprocess mode is used: the
`PROMETHEUS_MULTIPROC_DIR` environment variable must point at an empty folder before the workers start
(`dare serve` does this itself), and `/metrics` then aggregates the files of all workers. In that mode the
loaded-model gauge keeps the value of live processes only (`liveall`), and histograms/counters are summed.

Exported series (all prefixed `dare_`):
- http_request_duration_seconds{endpoint, method, model, status}   histogram, endpoint = route template
- stage_duration_seconds{stage, model}   histogram; stage in store_fetch, id_mapping, search, scoring
- history_length{model}, candidates_per_request{model}   histograms
- store_errors_total{operation, kind}, corrupt_sequences_total, degraded_responses_total,
  events_appended_total, events_replayed_total   counters
- model_info{model, version, kind, att_dim, repr_dim, top_k, default, search}   gauge, 1 while loaded (search: the
  fused kernel's instruction set, `avx512` or `avx2`, or `onnx` when search.onnx does the search)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

STAGES = ("store_fetch", "id_mapping", "search", "scoring")

# Latency buckets from 0.1 ms to 10 s: stages of a small request take well under a millisecond.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_HISTORY_BUCKETS = (0, 1, 10, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
_CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1_000, 2_000, 5_000)

MODEL_INFO_LABELS = ("model", "version", "kind", "att_dim", "repr_dim", "top_k", "default", "search")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


SCORING_STAGES = ("store_fetch", "id_mapping", "search", "scoring")


@dataclass(frozen=True)
class ScoringSeries:
    """One model's scoring series (`ServiceMetrics.scoring_series`)."""

    stages: dict[str, Histogram]  # stage -> dare_stage_duration_seconds{stage, model}
    history_length: Histogram
    candidates: Histogram


class ServiceMetrics:
    """Every metric of one app, registered in `self.registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "dare_http_request_duration_seconds",
            "HTTP request duration by route template, method, model and status code",
            ("endpoint", "method", "model", "status"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "dare_stage_duration_seconds",
            "Duration of one scoring stage (store_fetch, id_mapping, search, scoring) by model",
            ("stage", "model"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.history_length = Histogram(
            "dare_history_length",
            "History events used per scoring request (after the max_history cap)",
            ("model",),
            buckets=_HISTORY_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram(
            "dare_candidates_per_request",
            "Candidates per scoring request",
            ("model",),
            buckets=_CANDIDATE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "dare_store_errors_total",
            "Sequence-store failures by operation and kind (timeout, ConnectionError, response, ...)",
            ("operation", "kind"),
            registry=r,
        )
        self.corrupt_sequences = Counter(
            "dare_corrupt_sequences_total", "Reads or appends that met a corrupt stored sequence", registry=r
        )
        self.degraded_responses = Counter(
            "dare_degraded_responses_total",
            "Scores answered from an empty history because the store failed (DARE_DEGRADED_ON_STORE_ERROR)",
            registry=r,
        )
        self.events_appended = Counter("dare_events_appended_total", "Events appended through POST /events", registry=r)
        self.events_replayed = Counter(
            "dare_events_replayed_total", "POST /events requests answered as replays of an earlier Idempotency-Key", registry=r
        )
        self.model_info = Gauge(
            "dare_model_info",
            "Loaded models: 1 per loaded model with its key facts as labels",
            MODEL_INFO_LABELS,
            registry=r,
            multiprocess_mode="liveall",
        )
        self._model_labels: set[tuple[str, ...]] = set()
        self._scoring: dict[str, ScoringSeries] = {}
        self._requests: dict[tuple[str, str, str, str], Histogram] = {}

    def request_series(self, endpoint: str, method: str, model: str, status: str) -> Histogram:
        """dare_http_request_duration_seconds{endpoint, method, model, status}, bound once per label set (the same
        children prometheus-client keeps; `labels()` costs more than the `observe()` that follows it)."""
        key = (endpoint, method, model, status)
        series = self._requests.get(key)
        if series is None:
            series = self._requests[key] = self.request_duration.labels(endpoint=endpoint, method=method, model=model, status=status)
        return series

    def scoring_series(self, model: str) -> ScoringSeries:
        """The per-model series every scoring call observes (six per call), bound once as `request_series` is."""
        series = self._scoring.get(model)
        if series is None:
            series = ScoringSeries(
                stages={stage: self.stage_duration.labels(stage=stage, model=model) for stage in SCORING_STAGES},
                history_length=self.history_length.labels(model=model),
                candidates=self.candidates.labels(model=model),
            )
            self._scoring[model] = series
        return series

    def set_models(self, label_sets: list[tuple[str, ...]]) -> None:
        """Publish exactly these loaded models (each a tuple in MODEL_INFO_LABELS order)."""
        wanted = set(label_sets)
        for stale in self._model_labels - wanted:
            if multiprocess_dir():
                # Multiprocess values live in mmap files that cannot drop a series: mark it unloaded instead.
                self.model_info.labels(*stale).set(0)
            else:
                self.model_info.remove(*stale)
        for labels in wanted:
            self.model_info.labels(*labels).set(1)
        self._model_labels = wanted

    def exposition(self) -> bytes:
        """The text exposition format for GET /metrics (aggregated over workers in multiprocess mode)."""
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
