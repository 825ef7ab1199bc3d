"""The loaded models: every subfolder of the models directory, validated against its manifest, held as onnxruntime
sessions (search.onnx, score.onnx) plus a vectorised raw-id -> embedding-row map (vocab.npz).

Requests take one immutable `ModelSet` snapshot and use it to the end; `ModelRegistry.reload()` builds a new
snapshot (re-using unchanged models, loading new or changed folders, rejecting broken ones with a log line while
the old version keeps serving) and swaps it in with one reference assignment, so a reload never disturbs a request
in flight.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dare_common import DareError
from service.contract import (
    GRAPH_IO,
    MANIFEST_FILE,
    OOV_INDEX,
    TENSOR_DTYPES,
    VOCAB_ARRAYS,
    Manifest,
    ModelFolderError,
    load_manifest,
)
from service.errors import NoModelLoadedError, UnknownModelError
from service.search import FUSED_MIN_HISTORY_PER_K, ISA_NAMES, FusedSearch, SearchKernel, SearchPrecision, kernel_isa
from service.traffic import TRAFFIC_FILE, Routing, TrafficConfigError

log = logging.getLogger(__name__)

_ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class InferenceOptions:
    """onnxruntime session settings (see Settings.ort_*)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    search_kernel: SearchKernel = "auto"
    search_precision: SearchPrecision = "auto"

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Histories vary in length from call to call: the memory-pattern planner would re-plan every time.
        opts.enable_mem_pattern = False
        opts.log_severity_level = 3
        return opts


# A raw id -> row lookup table indexed by the raw id itself is used when it costs at most this many bytes
# (int32 rows, so raw ids up to ~16.7M: the Taobao log's item and category ids are below 5.2M). A lookup is then
# one gather per id; the binary search it replaces costs ~100 ns per id on random ids (a cache miss per probe),
# 5-15 ms for a 50,000-event history. Larger raw ids fall back to the binary search.
DENSE_LOOKUP_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class IdMap:
    """raw id -> embedding row for one field, unknown -> OOV row: a dense lookup table when the raw ids are small
    enough (see DENSE_LOOKUP_MAX_BYTES), else a binary search on the sorted raw ids. Raw ids are unsigned 64-bit
    (hashed item ids use the whole range); the lookups take any integer array of ids >= 0."""

    raw: np.ndarray  # uint64 [V], strictly increasing
    index: np.ndarray  # int64 [V], rows >= 2
    dense: np.ndarray | None = None  # int32 [max raw id + 2]: row of each raw id, OOV_INDEX for unknown ids and last

    @classmethod
    def build(cls, raw: np.ndarray, index: np.ndarray) -> IdMap:
        """From sorted unique raw ids (int64 or uint64; negative int64 ids, which no request can hold, are left
        out) and their rows."""
        if raw.dtype != np.uint64:
            keep = raw >= 0  # sorted: the negative ids are a prefix
            raw, index = raw[keep].astype(np.uint64), index[keep]
        raw, index = np.ascontiguousarray(raw), np.ascontiguousarray(index)
        dense = None
        if raw.size and (int(raw[-1]) + 2) * 4 <= DENSE_LOOKUP_MAX_BYTES and int(index.max()) < 2**31:
            dense = np.full(int(raw[-1]) + 2, OOV_INDEX, dtype=np.int32)  # ids past the last known one: the last entry
            dense[raw] = index
        return cls(raw, index, dense)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)  # [n]
        if ids.dtype != np.uint64:  # ids are >= 0 (validated): the same values as uint64
            ids = ids.astype(np.uint64)
        if self.raw.size == 0:
            return np.full(ids.shape, OOV_INDEX, dtype=np.int64)
        if self.dense is not None:
            return np.take(self.dense, np.minimum(ids, np.uint64(self.dense.size - 1))).astype(np.int64)
        pos = np.searchsorted(self.raw, ids)  # [n], insertion points
        pos = np.minimum(pos, self.raw.size - 1)
        hit = self.raw[pos] == ids  # [n]
        return np.where(hit, self.index[pos], OOV_INDEX).astype(np.int64, copy=False)


@dataclass(frozen=True)
class Vocab:
    item: IdMap
    cate: IdMap

    @classmethod
    def load(cls, path: Path, item_rows: int, cate_rows: int) -> Vocab:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"{path}: not a readable .npz without pickles: {exc}") from None
        missing = [a for a in VOCAB_ARRAYS if a not in arrays]
        if missing:
            raise ModelFolderError(f"{path}: missing arrays {missing}")
        maps = {}
        for fld, rows in (("item", item_rows), ("cate", cate_rows)):
            raw, index = arrays[f"{fld}_raw"], arrays[f"{fld}_index"]
            if raw.dtype not in (np.int64, np.uint64) or index.dtype != np.int64 or raw.ndim != 1 or raw.shape != index.shape:
                raise ModelFolderError(
                    f"{path}: {fld}_raw (int64 or uint64) and {fld}_index (int64) must be 1-D arrays of equal length"
                )
            if raw.size > 1 and not (np.diff(raw) > 0).all():
                raise ModelFolderError(f"{path}: {fld}_raw must be sorted and unique")
            if index.size and (index.min() < 2 or index.max() >= rows):
                raise ModelFolderError(f"{path}: {fld}_index must be within 2..{rows - 1} (rows from the manifest)")
            maps[fld] = IdMap.build(raw, index)
        return cls(item=maps["item"], cate=maps["cate"])


@dataclass(frozen=True)
class LoadedModel:
    name: str
    folder: Path
    manifest: Manifest
    fingerprint: str
    search: ort.InferenceSession
    score: ort.InferenceSession
    vocab: Vocab
    loaded_at: float
    fused: FusedSearch | None = None  # the fused search kernel, when usable (service/search.py)

    def info(self, *, default: bool) -> dict[str, object]:
        m = self.manifest
        return {
            "name": self.name,
            "version": m.version,
            "kind": m.model_kind,
            "att_dim": m.att_dim,
            "repr_dim": m.repr_dim,
            "top_k": m.top_k,
            "max_position": m.max_position,
            "item_rows": m.vocab.item_rows,
            "cate_rows": m.vocab.cate_rows,
            "opset": m.opset,
            "metrics": m.metrics,
            "data_fingerprint": m.data_fingerprint,
            "code_version": m.code_version,
            "created_at": m.created_at,
            "search": (
                f"fused kernel ({ISA_NAMES.get(kernel_isa(), '?')}{', bfloat16 pass 1' if self.fused.bf16 else ''}) from "
                f"{FUSED_MIN_HISTORY_PER_K * m.top_k:,} events, else search.onnx"
                if self.fused
                else "search.onnx"
            ),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "default": default,
        }


@dataclass(frozen=True)
class ModelSet:
    """An immutable snapshot of the loaded models, with the traffic split and shadow model that go with them."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    default: str | None = None
    routing: Routing = Routing()

    def route(self, name: str | None, user_id: str) -> tuple[LoadedModel, str]:
        """The model of a request and why: ("request": it named one, "split": the traffic split, "default")."""
        if name is not None:
            return self.get(name), "request"
        split = self.routing.split
        if split is not None:
            return self.models[split.choose(user_id)], "split"  # reload() installs only splits of loaded models
        return self.get(None), "default"

    def shadow_for(self, primary: LoadedModel) -> LoadedModel | None:
        """The shadow model to score a request of `primary` with, if any (never the primary itself)."""
        shadow = self.routing.shadow
        if shadow is None or shadow == primary.name:
            return None
        return self.models.get(shadow)

    def get(self, name: str | None) -> LoadedModel:
        if name is None:
            if self.default is None or self.default not in self.models:
                raise NoModelLoadedError(
                    "no model is loaded" if not self.models else f"the default model {self.default!r} is not loaded"
                )
            return self.models[self.default]
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModelError(f"model {name!r} is not loaded (loaded: {known})") from None


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    routing: Routing = Routing()  # the split and shadow now serving
    traffic_error: str | None = None  # why a new split / shadow was rejected (the previous one keeps serving)


def folder_fingerprint(folder: Path) -> str:
    """Changes whenever the manifest changes; the manifest pins every file's sha256, so that covers the files."""
    try:
        return hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def folder_state(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file's name, size and mtime: changes whenever anything in the folder is written."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


def _check_session(session: ort.InferenceSession, role: str, path: Path) -> None:
    inputs, outputs = GRAPH_IO[role]
    got_in = {i.name: i.type for i in session.get_inputs()}
    got_out = {o.name: o.type for o in session.get_outputs()}
    for names, got, what in ((inputs, got_in, "input"), (outputs, got_out, "output")):
        for name in names:
            if name not in got:
                raise ModelFolderError(f"{path}: graph has no {what} {name!r} (has {sorted(got)})")
            if got[name] != _ORT_TYPES[TENSOR_DTYPES[name]]:
                raise ModelFolderError(f"{path}: {what} {name!r} is {got[name]}, expected {TENSOR_DTYPES[name]}")
    if set(got_in) != set(inputs):
        raise ModelFolderError(f"{path}: graph inputs {sorted(got_in)} differ from the contract's {list(inputs)}")


# Models exported from the same prepared data share one vocab.npz (same sha256): they share its lookup tables too,
# for as long as one of them is loaded.
_VOCABS: weakref.WeakValueDictionary[tuple[str, int, int], Vocab] = weakref.WeakValueDictionary()
_VOCABS_LOCK = threading.Lock()


def _shared_vocab(path: Path, manifest: Manifest, *, verified: bool) -> Vocab:
    spec = manifest.vocab
    if not verified:  # the manifest's sha256 was not checked against the file: do not trust it as an identity
        return Vocab.load(path, spec.item_rows, spec.cate_rows)
    key = (spec.sha256, spec.item_rows, spec.cate_rows)
    with _VOCABS_LOCK:
        vocab = _VOCABS.get(key)
        if vocab is None:
            vocab = Vocab.load(path, spec.item_rows, spec.cate_rows)
            _VOCABS[key] = vocab
        return vocab


def load_model(folder: Path, options: InferenceOptions, *, verify_hashes: bool = True) -> LoadedModel:
    """Validate a model folder and build its sessions and id maps; ModelFolderError says what is wrong."""
    folder = Path(folder)
    fingerprint = folder_fingerprint(folder)
    manifest = load_manifest(folder, verify_hashes=verify_hashes)
    if manifest.name != folder.name:
        log.warning("model folder %s holds manifest name %r; serving it as %r", folder, manifest.name, folder.name)
    sessions = {}
    for role in ("search", "score"):
        path = folder / manifest.graphs[role].file
        try:
            sess = ort.InferenceSession(str(path), sess_options=options.session_options(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFolderError(f"{path}: onnxruntime cannot load it: {exc}") from None
        _check_session(sess, role, path)
        sessions[role] = sess
    vocab = _shared_vocab(folder / manifest.vocab.file, manifest, verified=verify_hashes)
    fused = FusedSearch.load(folder, manifest, sessions["search"], options.search_kernel, options.search_precision)
    return LoadedModel(
        name=folder.name,
        folder=folder,
        manifest=manifest,
        fingerprint=fingerprint,
        search=sessions["search"],
        score=sessions["score"],
        vocab=vocab,
        loaded_at=time.time(),
        fused=fused,
    )


class ModelRegistry:
    """Owns the current ModelSet; `reload()` is serialised, readers never lock."""

    def __init__(
        self,
        models_dir: Path,
        options: InferenceOptions,
        *,
        default_model: str | None = None,
        verify_hashes: bool = True,
        on_change: Callable[[ModelSet], None] | None = None,
        routing: Callable[[], Routing] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.options = options
        self.default_model = default_model
        self.verify_hashes = verify_hashes
        self.on_change = on_change
        self.routing = routing  # read on every reload (service.traffic.routing_source)
        self._traffic_state: tuple[int, int] | None = None  # traffic.json's (size, mtime) at the last reload
        self._current = ModelSet()
        self._lock = threading.Lock()
        self._rejected: dict[str, tuple[tuple[str, int, int], ...]] = {}  # folder -> state when last rejected

    @property
    def current(self) -> ModelSet:
        return self._current

    def folders(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def changed(self) -> bool:
        """Whether reload() would do anything (for the polling watcher): folders added, removed or changed."""
        if self.routing is not None and self._traffic_file_state() != self._traffic_state:
            return True
        current = self._current.models
        seen = {p.name: p for p in self.folders()}
        if set(current) - set(seen):
            return True
        for name, folder in seen.items():
            if name in current and folder_fingerprint(folder) == current[name].fingerprint:
                continue
            # New or changed: worth a reload unless this exact state was already rejected (no retry loop on a
            # folder that stays broken; any file written since then makes it worth another try).
            if self._rejected.get(name) != folder_state(folder):
                return True
        return False

    def reload(self) -> ReloadReport:
        with self._lock:
            old = self._current
            report = ReloadReport()
            models: dict[str, LoadedModel] = {}
            for folder in self.folders():
                name = folder.name
                previous = old.models.get(name)
                if previous is not None and folder_fingerprint(folder) == previous.fingerprint:
                    models[name] = previous
                    report.unchanged.append(name)
                    continue
                try:
                    models[name] = load_model(folder, self.options, verify_hashes=self.verify_hashes)
                except (ModelFolderError, DareError, OSError) as exc:
                    report.rejected[name] = str(exc)
                    self._rejected[name] = folder_state(folder)
                    if previous is not None:
                        models[name] = previous
                        log.error("model %s: new version rejected, version %s keeps serving: %s",
                                  name, previous.manifest.version, exc)
                    else:
                        log.error("model %s: rejected: %s", name, exc)
                    continue
                report.loaded.append(name)
                log.info("model %s: loaded version %s (%s, att_dim %d, repr_dim %d, top_k %d)", name,
                         models[name].manifest.version, models[name].manifest.model_kind,
                         models[name].manifest.att_dim, models[name].manifest.repr_dim, models[name].manifest.top_k)
            report.removed = sorted(set(old.models) - set(models))
            for name in report.removed:
                log.info("model %s: folder gone, unloaded", name)
            default = self._pick_default(models)
            report.default = default
            report.routing, report.traffic_error = self._pick_routing(models, old.routing)
            self._current = ModelSet(models=models, default=default, routing=report.routing)
            if self.on_change is not None:
                self.on_change(self._current)
            return report

    def _traffic_file_state(self) -> tuple[int, int] | None:
        try:
            st = (self.models_dir / TRAFFIC_FILE).stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _pick_routing(self, models: dict[str, LoadedModel], old: Routing) -> tuple[Routing, str | None]:
        """The split and shadow to serve with these models: the configured ones if valid, else the previous ones
        (if their models are still loaded, else none), with the reason logged."""
        if self.routing is None:
            return Routing(), None
        self._traffic_state = self._traffic_file_state()
        try:
            wanted = self.routing()
            unknown = wanted.unknown_models(models)
            if unknown:
                raise TrafficConfigError(
                    f"{wanted.source}: {', '.join(map(repr, unknown))} not loaded (loaded: {', '.join(sorted(models)) or 'none'})"
                )
        except TrafficConfigError as exc:
            keep = old if not old.unknown_models(models) else Routing()
            log.error("traffic split rejected: %s; serving %s", exc, keep.describe())
            return keep, str(exc)
        if wanted != old:
            log.info("traffic: %s", wanted.describe())
        return wanted, None

    def _pick_default(self, models: dict[str, LoadedModel]) -> str | None:
        if self.default_model is not None:
            if self.default_model not in models:
                log.error("default model %r is not loaded; requests naming no model get 503", self.default_model)
            return self.default_model
        return min(models) if models else None
