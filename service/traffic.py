"""Traffic split between models and shadow scoring (docs/operations.md).

A split (`DARE_TRAFFIC_SPLIT="dare-att16=90,dare-att64=10"`, or `traffic.json` in the models dir) routes the
POST /score requests that name no model by a stable hash of the user id: blake2b of the id's UTF-8 bytes, modulo
10,000 buckets, each arm owning one contiguous range of buckets in the order written. A user keeps its arm for as
long as the split is the same, across requests, processes, replicas and restarts; changing the weights moves only
the users whose buckets change hands.

The split is part of the registry's `ModelSet` snapshot, so it changes with a reload (POST /admin/reload, SIGHUP,
the polling watcher): `traffic.json`, when present, is re-read on every reload and wins over the two variables. A
split or shadow model naming a model that is not loaded is rejected with a log line (and in the reload's answer),
and the previous split keeps serving.

Shadow scoring (`DARE_SHADOW_MODEL`, or `"shadow"` in traffic.json) scores the same request with a second model
after the answer is sent, from the history the primary read, in one of the scoring workers, and only while fewer
than half of them are busy and no other shadow call is running: it can take at most one worker and only an idle
one. Its scores are never returned; the mean |primary - shadow| per request goes to `dare_shadow_score_diff`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dare_common import DareError

if TYPE_CHECKING:
    from service.api.concurrency import BlockingPool
    from service.engine import ScoreResult
    from service.metrics import ServiceMetrics
    from service.registry import LoadedModel

log = logging.getLogger(__name__)

SPLIT_BUCKETS = 10_000
TRAFFIC_FILE = "traffic.json"


class TrafficConfigError(DareError):
    """A traffic split or shadow model that cannot be used; the message names the setting and what is wrong."""


def user_bucket(user_id: str) -> int:
    """The user's bucket in 0..SPLIT_BUCKETS-1: stable across processes and versions (no per-process hash seed)."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SPLIT_BUCKETS


@dataclass(frozen=True)
class TrafficSplit:
    """Arms in the order written, each with its weight and the upper end (exclusive) of its bucket range."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    bounds: tuple[int, ...]

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], where: str = "split") -> TrafficSplit:
        if not weights:
            raise TrafficConfigError(f"{where}: no model named (write model=weight, ...)")
        for name, weight in weights.items():
            if not name or not isinstance(name, str):
                raise TrafficConfigError(f"{where}: an arm has no model name")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0 or weight == float("inf"):
                raise TrafficConfigError(f"{where}: the weight of {name!r} must be a finite number >= 0, got {weight!r}")
        total = float(sum(weights.values()))
        if not total > 0:
            raise TrafficConfigError(f"{where}: the weights must sum to more than 0")
        bounds, running = [], 0.0
        for weight in weights.values():
            running += weight
            bounds.append(round(running / total * SPLIT_BUCKETS))
        bounds[-1] = SPLIT_BUCKETS
        return cls(tuple(weights), tuple(float(w) for w in weights.values()), tuple(bounds))

    @classmethod
    def parse(cls, text: str, where: str = "DARE_TRAFFIC_SPLIT") -> TrafficSplit:
        """`"a=90,b=10"` (weights are relative: 9,1 is the same split)."""
        weights: dict[str, float] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not name:
                raise TrafficConfigError(f"{where}: {part.strip()!r} is not model=weight (e.g. dare-att16=90,dare-att64=10)")
            if name in weights:
                raise TrafficConfigError(f"{where}: model {name!r} is named twice")
            try:
                weights[name] = float(value)
            except ValueError:
                raise TrafficConfigError(f"{where}: the weight of {name!r} is not a number: {value.strip()!r}") from None
        return cls.from_weights(weights, where)

    def choose(self, user_id: str) -> str:
        return self.names[bisect_right(self.bounds, user_bucket(user_id))]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    def __str__(self) -> str:
        return ",".join(f"{n}={w:g}" for n, w in zip(self.names, self.weights))


@dataclass(frozen=True)
class Routing:
    """What a reload installs next to the models: the split and the shadow model (either may be absent)."""

    split: TrafficSplit | None = None
    shadow: str | None = None
    source: str = "none"  # where it was read: "DARE_TRAFFIC_SPLIT / DARE_SHADOW_MODEL" or the traffic.json path

    def unknown_models(self, loaded: Mapping[str, object]) -> list[str]:
        names = [*(self.split.names if self.split else ()), *([self.shadow] if self.shadow else [])]
        return [n for n in dict.fromkeys(names) if n not in loaded]

    def describe(self) -> str:
        if self.split is None and self.shadow is None:
            return "no split, no shadow"
        return f"split {self.split or 'none'}, shadow {self.shadow or 'none'} (from {self.source})"


def read_traffic_file(path: Path) -> Routing:
    """`{"split": {"model": weight, ...} | null, "shadow": "model" | null}`; both keys optional."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrafficConfigError(f"{path}: not a readable JSON file: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"split", "shadow"}:
        raise TrafficConfigError(f'{path}: expected an object with the keys "split" and/or "shadow", got {doc!r:.200}')
    split_doc, shadow = doc.get("split"), doc.get("shadow")
    if split_doc is not None and not isinstance(split_doc, dict):
        raise TrafficConfigError(f'{path}: "split" must be an object {{"model": weight, ...}} or null')
    if shadow is not None and (not isinstance(shadow, str) or not shadow):
        raise TrafficConfigError(f'{path}: "shadow" must be a model name or null')
    split = TrafficSplit.from_weights(split_doc, f'{path}: "split"') if split_doc is not None else None
    return Routing(split, shadow, str(path))


def routing_source(models_dir: Path, split: str | None, shadow: str | None) -> Callable[[], Routing]:
    """What the registry calls on every reload: traffic.json in the models dir when it exists, else the variables."""
    env = Routing(TrafficSplit.parse(split) if split else None, shadow or None, "DARE_TRAFFIC_SPLIT / DARE_SHADOW_MODEL")
    path = Path(models_dir) / TRAFFIC_FILE

    def read() -> Routing:
        return read_traffic_file(path) if path.is_file() else env

    return read


class ShadowScorer:
    """Scores a request again with the shadow model after its answer, only in an idle worker (module docstring)."""

    def __init__(self, blocking: BlockingPool, metrics: ServiceMetrics) -> None:
        self.blocking = blocking
        self.metrics = metrics
        self._running = threading.Event()  # set while a shadow call is queued or running (one at a time)

    def offer(self, shadow: LoadedModel, result: ScoreResult, items: np.ndarray, cates: np.ndarray) -> bool:
        """Start the shadow call if a worker is idle (on the event loop, after the primary finished); False if skipped."""
        if self._running.is_set() or self.blocking.busy >= max(1, self.blocking.threads // 2):
            self.metrics.shadow_outcome(shadow.name, "skipped").inc()
            return False
        self._running.set()
        try:
            future = self.blocking.submit(lambda: self._score(shadow, result, items, cates), on_done=self._running.clear)
        except RuntimeError:  # the pool is shut down: the process is stopping
            self._running.clear()
            return False
        future.add_done_callback(_retrieve)
        return True

    def _score(self, shadow: LoadedModel, result: ScoreResult, items: np.ndarray, cates: np.ndarray) -> None:
        from service.engine import run_graphs

        try:
            probs = run_graphs(shadow, result.history, items, cates)[0]
        except Exception:
            self.metrics.shadow_outcome(shadow.name, "error").inc()
            log.exception("shadow scoring with %s failed", shadow.name)
            return
        diff = float(np.abs(probs.astype(np.float64) - result.probs.astype(np.float64)).mean()) if len(probs) else 0.0
        self.metrics.shadow_diff.labels(model=result.model.name, shadow=shadow.name).observe(diff)
        self.metrics.shadow_outcome(shadow.name, "scored").inc()
        log.debug("shadow %s vs %s: mean |diff| %.6f over %d candidates", shadow.name, result.model.name, diff, len(probs))


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # _score logs its own errors; this only keeps asyncio from warning


def check_traffic(models_dir: Path, split: str | None, shadow: str | None) -> Routing:
    """`dare serve`'s check before it starts: the split and shadow (traffic.json's, else the variables') name model
    folders of the models dir; TrafficConfigError says what is wrong."""
    routing = routing_source(models_dir, split, shadow)()
    folders = {p.name: p for p in Path(models_dir).iterdir() if p.is_dir()} if Path(models_dir).is_dir() else {}
    unknown = routing.unknown_models(folders)
    if unknown:
        raise TrafficConfigError(
            f"{routing.source}: no model folder {', '.join(map(repr, unknown))} in {models_dir} (has: {', '.join(sorted(folders)) or 'none'})"
        )
    return routing
