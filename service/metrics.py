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
- http_requests_in_flight   gauge, HTTP requests being handled (summed over live workers; a scrape counts itself)
- queue_wait_seconds{operation}   histogram, from a call's arrival at the worker pool (its user's share included)
  to its start in a worker thread (operation: scoring, append, history_read, store_ping); a call dropped by the
  timeout before it started observes the time it waited
- traffic_split_requests_total{model}   counter, /score requests routed by the traffic split, per model (arm); the
  requests per model, however chosen, are dare_http_request_duration_seconds_count{endpoint="/score", model}
- shadow_requests_total{shadow, outcome}, shadow_score_diff{model, shadow}   shadow scoring (service/traffic.py):
  outcome scored / skipped (no idle worker) / error; the mean |primary - shadow| probability per request

And, without the prefix, prometheus-client's process and GC collectors: process_cpu_seconds_total,
process_resident_memory_bytes, process_virtual_memory_bytes, process_open_fds, process_max_fds,
process_start_time_seconds, python_gc_{objects_collected,objects_uncollectable,collections}_total{generation}.
prometheus-client documents that such collectors do not work in multiprocess mode; there each worker copies what
they read into multiprocess metrics every PROCESS_SAMPLE_INTERVAL_S and at each scrape it answers (`sample_process`):
the counters are summed over the workers (dead ones included, so CPU seconds never go back), the gauges are per live
worker, labelled `pid` (the `liveall` mode).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, GCCollector, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import multiprocess
from prometheus_client.registry import Collector

STAGES = ("store_fetch", "id_mapping", "search", "scoring")

# Latency buckets from 0.1 ms to 10 s: stages of a small request take well under a millisecond.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_HISTORY_BUCKETS = (0, 1, 10, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
_CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1_000, 2_000, 5_000)

_DIFF_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PROCESS_SAMPLE_INTERVAL_S = 5.0

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
        self.in_flight = Gauge(
            "dare_http_requests_in_flight", "HTTP requests being handled", registry=r, multiprocess_mode="livesum"
        )
        # One process: a plain count on the event loop, read at scrape time (a gauge's inc and dec cost ~1 us each
        # per request). Several: the gauge itself, whose values the workers share through their files.
        self.in_flight_count = 0
        self.in_flight_shared = multiprocess_dir() is not None
        if not self.in_flight_shared:
            self.in_flight.set_function(lambda: self.in_flight_count)
        self.queue_wait = Histogram(
            "dare_queue_wait_seconds",
            "Wait of a blocking call (scoring, append, ...) for its worker thread, its user's share included",
            ("operation",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.split_requests = Counter(
            "dare_traffic_split_requests",
            "POST /score requests routed by the traffic split, by the model (arm) it chose",
            ("model",),
            registry=r,
        )
        self.shadow_requests = Counter(
            "dare_shadow_requests", "Shadow scoring calls by shadow model and outcome (scored, skipped, error)",
            ("shadow", "outcome"), registry=r,
        )  # fmt: skip
        self.shadow_diff = Histogram(
            "dare_shadow_score_diff",
            "Mean |primary - shadow| click probability per shadow-scored request",
            ("model", "shadow"),
            buckets=_DIFF_BUCKETS,
            registry=r,
        )
        self._model_labels: set[tuple[str, ...]] = set()
        self._scoring: dict[str, ScoringSeries] = {}
        self._requests: dict[tuple[str, str, str, str], Histogram] = {}
        self._waits: dict[str, Histogram] = {}
        self._split: dict[str, Counter] = {}
        self._process_copy: ProcessCopy | None = None
        if multiprocess_dir():
            self._process_copy = ProcessCopy(r)
        else:
            ProcessCollector(registry=r)
            GCCollector(registry=r)

    def queue_wait_series(self, operation: str) -> Histogram:
        """dare_queue_wait_seconds{operation}, bound once per operation ("history read" -> history_read)."""
        series = self._waits.get(operation)
        if series is None:
            series = self._waits[operation] = self.queue_wait.labels(operation=operation.replace(" ", "_"))
        return series

    def split_series(self, model: str) -> Counter:
        """dare_traffic_split_requests_total{model}, bound once per model."""
        series = self._split.get(model)
        if series is None:
            series = self._split[model] = self.split_requests.labels(model=model)
        return series

    def shadow_outcome(self, shadow: str, outcome: str) -> Counter:
        return self.shadow_requests.labels(shadow=shadow, outcome=outcome)

    def sample_process(self) -> None:
        """Multiprocess mode: copy this worker's process and GC figures into the shared metrics (no-op otherwise)."""
        if self._process_copy is not None:
            self._process_copy.sample()

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
            self.sample_process()  # this worker's figures are fresh; the others' are at most an interval old
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class ProcessCopy:
    """prometheus-client's ProcessCollector and GCCollector read in this process and written into multiprocess
    metrics of the same names: counters as increments (summed over workers), gauges per live worker (`liveall`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sources: list[Collector] = [ProcessCollector(registry=None), GCCollector(registry=CollectorRegistry())]
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.last: dict[tuple[str, tuple[str, ...]], float] = {}  # counter samples as last copied
        self.lock = threading.Lock()  # the periodic task and a scrape (in a thread) may sample at once

    def sample(self) -> None:
        with self.lock:
            self._sample()

    def _sample(self) -> None:
        for source in self.sources:
            for family in source.collect():
                for sample in family.samples:
                    labels = tuple(sorted(sample.labels))
                    values = tuple(sample.labels[k] for k in labels)
                    if family.type == "counter" and sample.name.endswith("_total"):
                        counter = self.counters.get(family.name)
                        if counter is None:
                            counter = self.counters[family.name] = Counter(
                                family.name, family.documentation, labels, registry=self.registry
                            )
                        key = (sample.name, values)
                        delta = sample.value - self.last.get(key, 0.0)
                        self.last[key] = sample.value
                        child = counter.labels(*values) if labels else counter  # the series exists from 0 on
                        if delta > 0:
                            child.inc(delta)
                    elif family.type == "gauge":
                        gauge = self.gauges.get(family.name)
                        if gauge is None:
                            gauge = self.gauges[family.name] = Gauge(
                                family.name, family.documentation, labels, registry=self.registry,
                                multiprocess_mode="liveall",
                            )  # fmt: skip
                        (gauge.labels(*values) if labels else gauge).set(sample.value)
