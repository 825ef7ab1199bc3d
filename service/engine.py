"""Scoring one user against candidates: store fetch -> id mapping -> search (search.onnx) -> scoring (score.onnx).

No FastAPI here: the HTTP layer and the in-process benchmark call the same `ScoringEngine`. Every stage's duration
is measured and returned (and observed in the metrics when the engine has them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from service.contract import PROB_OUTPUT, SEARCH_OUTPUTS
from service.errors import StoreUnavailableError
from service.registry import LoadedModel, ModelRegistry
from service.search import SearchSplitter, use_fused
from service.store import RECORD_DTYPE, History, SequenceStore

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics


@dataclass
class ScoreResult:
    model: LoadedModel
    probs: np.ndarray  # float32 [C], candidate order
    history: np.ndarray  # RECORD_DTYPE [N], the events used, oldest first
    stored_length: int  # events the store holds for the user (>= N)
    cold_start: bool  # the user has no stored sequence
    degraded: bool  # the store failed and the history was taken as empty
    topk_index: np.ndarray | None = None  # int64 [C, K], positions in `history`, -1 = padding
    topk_weight: np.ndarray | None = None  # float32 [C, K]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    started_ns: int = 0  # wall clock (time.time_ns) when the store fetch began; the stages follow in order


@dataclass(frozen=True)
class Fetched:
    """A user's history as read for one call (`ScoringEngine.fetch`)."""

    history: History
    degraded: bool  # the store failed and the history was taken as empty
    seconds: float


@dataclass(frozen=True)
class GraphTimings:
    id_mapping: float
    search: float
    scoring: float


def run_graphs(
    model: LoadedModel,
    history: np.ndarray,
    cand_item: np.ndarray,
    cand_cate: np.ndarray,
    run_options: ort.RunOptions | None = None,
    splitter: SearchSplitter | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, GraphTimings]:
    """Map raw ids to rows and run search then scoring; returns (prob [C], topk_index [C,K], topk_weight [C,K]).
    With a `splitter`, a long fused search may use more than one thread."""
    t0 = time.perf_counter()
    feeds = {
        "hist_item": model.vocab.item(history["item_id"]),  # [N]
        "hist_cate": model.vocab.cate(history["category_id"]),  # [N]
        "cand_item": model.vocab.item(cand_item),  # [C]
        "cand_cate": model.vocab.cate(cand_cate),  # [C]
    }
    # Equal candidates are scored once: a candidate's float sums can depend on its row in the batch (the graphs'
    # kernels handle rows in groups), and duplicates must get exactly equal scores (the API documents it).
    key = feeds["cand_item"] * (int(feeds["cand_cate"].max(initial=0)) + 1) + feeds["cand_cate"]  # [C]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    duplicates = len(first) < len(key)
    if duplicates:
        feeds["cand_item"], feeds["cand_cate"] = feeds["cand_item"][first], feeds["cand_cate"][first]
    t1 = time.perf_counter()
    if use_fused(model.fused, len(history)):
        assert model.fused is not None
        args = (feeds["hist_item"], feeds["hist_cate"], feeds["cand_item"], feeds["cand_cate"])
        topk_index, topk_weight = model.fused.run(*args) if splitter is None else splitter.run(model.fused, *args)
    else:
        topk_index, topk_weight = model.search.run(list(SEARCH_OUTPUTS), feeds, run_options)  # [C, K] each
    t2 = time.perf_counter()
    feeds["topk_index"] = topk_index
    feeds["topk_weight"] = topk_weight
    (prob,) = model.score.run([PROB_OUTPUT], feeds, run_options)  # [C]
    if duplicates:
        prob, topk_index, topk_weight = prob[inverse], topk_index[inverse], topk_weight[inverse]
    t3 = time.perf_counter()
    return prob, topk_index, topk_weight, GraphTimings(t1 - t0, t2 - t1, t3 - t2)


class ScoringEngine:
    def __init__(
        self,
        store: SequenceStore,
        registry: ModelRegistry,
        *,
        max_history: int = 100_000,
        degraded_on_store_error: bool = False,
        metrics: ServiceMetrics | None = None,
        search_threads: int = 1,
    ) -> None:
        self.store = store
        self.registry = registry
        self.max_history = max_history
        self.degraded_on_store_error = degraded_on_store_error
        self.metrics = metrics
        self.splitter = SearchSplitter(search_threads)

    def fetch(self, user_id: str) -> Fetched:
        """The user's history from the store (blocking), or an empty degraded one when the store fails and
        DARE_DEGRADED_ON_STORE_ERROR is on."""
        t0 = time.perf_counter()
        try:
            return Fetched(self.store.read(user_id, self.max_history), False, time.perf_counter() - t0)
        except StoreUnavailableError as exc:
            return self._degraded(exc, t0)

    def _degraded(self, error: StoreUnavailableError, t0: float) -> Fetched:
        """An empty history flagged degraded (DARE_DEGRADED_ON_STORE_ERROR), else the store's error."""
        if not self.degraded_on_store_error:
            raise error
        return Fetched(History(np.empty(0, dtype=RECORD_DTYPE), 0, False), True, time.perf_counter() - t0)

    def score(
        self,
        user_id: str,
        cand_item: np.ndarray,
        cand_cate: np.ndarray,
        *,
        model: LoadedModel | None = None,
        model_name: str | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> ScoreResult:
        """Score candidates (int64 raw ids, [C] each) for a user with `model`, else the loaded `model_name`, else
        the default model; the history is read from the store. Raises the service's specific errors."""
        if model is None:
            model = self.registry.current.get(model_name)  # one snapshot for the whole call
        started_ns = time.time_ns()
        with self.splitter.call():
            fetched = self.fetch(user_id)
            hist, degraded = fetched.history, fetched.degraded
            prob, topk_index, topk_weight, t = run_graphs(model, hist.events, cand_item, cand_cate, run_options, self.splitter)
        timings = {"store_fetch": fetched.seconds, "id_mapping": t.id_mapping, "search": t.search, "scoring": t.scoring}
        if self.metrics is not None:
            series = self.metrics.scoring_series(model.name)
            for stage, seconds in timings.items():
                series.stages[stage].observe(seconds)
            series.history_length.observe(len(hist.events))
            series.candidates.observe(len(cand_item))
            if degraded:
                self.metrics.degraded_responses.inc()
        return ScoreResult(
            model=model,
            probs=prob,
            history=hist.events,
            stored_length=hist.stored_length,
            cold_start=not hist.exists and not degraded,
            degraded=degraded,
            topk_index=topk_index,
            topk_weight=topk_weight,
            timings=timings,
            started_ns=started_ns,
        )
