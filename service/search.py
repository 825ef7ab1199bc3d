"""The fused search (service/_search.c): the GSU of one user without the [C, N] score matrix search.onnx builds.

search.onnx computes every candidate's score against every history event with one MatMul, writes the [C, N] matrix
(8 MB at N = 10,000, C = 200), reads it back and runs one TopK over it. At small attention dims that memory round
trip and the TopK cost more than the MatMul, so its time stops shrinking with d_att. The kernel computes the same
scores tile by tile in registers, keeps one maximum per block of 8 events, and rescores exactly only the blocks that
can hold a candidate's K best. Same answers as search.onnx (the same retrieved events and weights; float32 sums in
another order), checked when a model loads (`FusedSearch.load`) and in tests/service/test_fused_search.py.

Used for histories of at least FUSED_MIN_HISTORY_PER_K x top-K events when the model folder carries attention.npz
(`dare export` writes it for DARE and TWIN), the extension was built, and the CPU has AVX-512F or AVX2 + FMA (the
kernel is compiled for both and runs the best one); otherwise, and with DARE_SEARCH_KERNEL=onnx, the service runs
search.onnx. `dare bench` times it against search.onnx and against FAISS and numpy on the same tables
(docs/performance.md has the current figures).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.contract import SEARCH_OUTPUTS, Manifest, ModelFolderError

try:
    from service import _search as _kernel
except ImportError:  # built without a C compiler: search.onnx only
    _kernel = None

log = logging.getLogger("dare.service")

SearchKernel = Literal["auto", "fused", "onnx"]
SearchPrecision = Literal["auto", "float32", "bfloat16"]

# The kernel runs from this many x top-K events (200 at top-20). With fewer than about K blocks of 8 events its block
# maxima prune nothing and it rescores every event, where search.onnx's single TopK is as fast. At W1 (N = 200,
# C = 100) `dare bench` measures it faster at every dim (table "Changes" in docs/bench/bench.md).
FUSED_MIN_HISTORY_PER_K = 10

# The load-time check: one synthetic user scored both ways.
_CHECK_HISTORY, _CHECK_CANDIDATES, _CHECK_WEIGHT_TOLERANCE = 3_000, 16, 1e-5

# DARE_SEARCH_PRECISION=auto runs pass 1 in bfloat16 only where that is at least this much faster than float32 on
# this CPU and these tables, timed when the model loads (`FusedSearch.bf16_gain`): `dare bench` measured the kernel
# 1.3-2.0x as fast with it on an AMD EPYC and 0.82-0.97x as fast on an Intel Xeon (docs/performance.md).
BF16_MIN_GAIN = 1.1
_TIMING_HISTORY, _TIMING_CANDIDATES, _TIMING_ROUNDS = 20_000, 64, 3


def use_fused(fused: FusedSearch | None, history_length: int) -> bool:
    """Whether the fused kernel searches a history of this length (else search.onnx)."""
    return fused is not None and history_length >= FUSED_MIN_HISTORY_PER_K * fused.top_k


ISA_NAMES = {512: "AVX-512F", 256: "AVX2 + FMA"}

# The kernel handles candidates in tiles of this many; a split search gives each thread whole tiles.
CANDIDATE_TILE = 32
# A search is split over threads from this many (history events x candidates) on: W2 (10,000 x 200) and up.
SPLIT_MIN_WORK = 2_000_000


def kernel_isa() -> int:
    """The instruction set the kernel runs with here: 512 (AVX-512F), 256 (AVX2 + FMA), 0 (none: not built, or a CPU
    with neither)."""
    return 0 if _kernel is None else int(_kernel.isa())


def kernel_available() -> tuple[bool, str]:
    """(usable, why not) for the compiled kernel on this machine."""
    if _kernel is None:
        return False, "service._search was not built (no C compiler at install time)"
    if not kernel_isa():
        return False, "this CPU has neither AVX-512F nor AVX2 + FMA"
    return True, ""


def kernel_bf16() -> bool:
    """Whether the kernel can run its pass 1 in bfloat16 here (AVX-512 BF16)."""
    return _kernel is not None and bool(_kernel.bf16())


def to_bf16_pairs(table: np.ndarray) -> np.ndarray:
    """float32 [rows, d] -> bfloat16 rounded to nearest even, two per uint32 (the lower half first), [rows, (d+1)//2];
    an odd d gets a zero column."""
    rows, d = table.shape
    bits = np.zeros((rows, d + d % 2), dtype=np.uint32)
    bits[:, :d] = np.ascontiguousarray(table, dtype=np.float32).view(np.uint32)
    half = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # finite values: no overflow to NaN
    return np.ascontiguousarray(half).view(np.uint32)


@dataclass(frozen=True)
class Bf16Tables:
    """The attention tables in bfloat16 pairs for pass 1, and per table the largest row norm |h| and the largest
    rounding error |bfloat16(h) - h| of a row: the kernel bounds each approximate score's error with them."""

    item: np.ndarray  # uint32 [item_rows, (d+1)//2]
    cate: np.ndarray  # uint32 [cate_rows, (d+1)//2]
    item_norm: float
    cate_norm: float
    item_err: float
    cate_err: float

    @classmethod
    def of(cls, item: np.ndarray, cate: np.ndarray) -> Bf16Tables:
        def largest_norm(t: np.ndarray) -> float:
            return float(np.sqrt(np.square(t, dtype=np.float64).sum(axis=1).max(initial=0.0)))

        def rounded(pairs: np.ndarray, d: int) -> np.ndarray:  # the bfloat16 values back in float64
            return (pairs.view(np.uint16)[:, :d].astype(np.uint32) << 16).view(np.float32).astype(np.float64)

        item16, cate16 = to_bf16_pairs(item), to_bf16_pairs(cate)
        d = item.shape[1]
        return cls(item16, cate16, largest_norm(item), largest_norm(cate),
                   largest_norm(rounded(item16, d) - item), largest_norm(rounded(cate16, d) - cate))  # fmt: skip


@dataclass(frozen=True)
class FusedSearch:
    item: np.ndarray  # float32 [item_rows, d], C-contiguous
    cate: np.ndarray  # float32 [cate_rows, d]
    position_column: np.ndarray  # float32 [max_position + 1]
    scale: float
    max_position: int
    top_k: int
    isa: int = 0  # 0: the best this CPU has; 512 or 256 to pick one (tests compare both)
    bf16: Bf16Tables | None = None  # pass 1 in bfloat16 (kernel_bf16()), else float32

    @property
    def att_dim(self) -> int:
        return int(self.item.shape[1])

    def with_bf16(self) -> FusedSearch:
        """The same search with its pass 1 in bfloat16 (the CPU must have AVX-512 BF16: `kernel_bf16()`)."""
        return replace(self, bf16=Bf16Tables.of(self.item, self.cate))

    def run(
        self, hist_item: np.ndarray, hist_cate: np.ndarray, cand_item: np.ndarray, cand_cate: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embedding rows (int64) in, (topk_index int64 [C, K] with -1 = padding, topk_weight float32 [C, K]) out:
        search.onnx's outputs. Releases the GIL while it computes."""
        assert _kernel is not None
        c = len(cand_item)
        index = np.empty((c, self.top_k), dtype=np.int64)
        weight = np.empty((c, self.top_k), dtype=np.float32)
        _kernel.search(
            self.item, self.cate, self.position_column, self.att_dim,
            np.ascontiguousarray(hist_item, dtype=np.int64), np.ascontiguousarray(hist_cate, dtype=np.int64),
            np.ascontiguousarray(cand_item, dtype=np.int64), np.ascontiguousarray(cand_cate, dtype=np.int64),
            self.scale, self.max_position, self.top_k, index, weight, self.isa,
            *(() if (b := self.bf16) is None else (b.item, b.cate, b.item_norm, b.cate_norm, b.item_err, b.cate_err)),
        )  # fmt: skip
        return index, weight

    def run_split(self, hist_item: np.ndarray, hist_cate: np.ndarray, cand_item: np.ndarray, cand_cate: np.ndarray,
                  pool: ThreadPoolExecutor, parts: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """`run` with the candidates cut into `parts` slices of whole tiles, the first searched in this thread and the
        others in `pool`. A candidate's top-K depends on that candidate alone, so the answer is `run`'s exactly.

        This thread, which starts at once, takes the larger share (7 tiles: 4 here, 3 in the pool's thread, which
        starts later): W3 att 16, 3.63 ms against 4.31 with the shares the other way round (on an AMD EPYC VM)."""
        tiles = -(-len(cand_item) // CANDIDATE_TILE)
        cuts = [min(CANDIDATE_TILE * -(-tiles * p // parts), len(cand_item)) for p in range(parts)] + [len(cand_item)]
        slices = [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        futures = [pool.submit(self.run, hist_item, hist_cate, cand_item[s], cand_cate[s]) for s in slices[1:]]
        results = [self.run(hist_item, hist_cate, cand_item[slices[0]], cand_cate[slices[0]])]
        results += [f.result() for f in futures]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    @classmethod
    def load(cls, folder: Path, manifest: Manifest, search: ort.InferenceSession, kernel: SearchKernel,
             precision: SearchPrecision = "auto") -> FusedSearch | None:  # fmt: skip
        """The fused search for this folder, or None (search.onnx) when the setting, the build, the CPU or the folder
        rules it out; its pass 1 in bfloat16 where `precision` and the CPU allow. A folder whose attention.npz is
        malformed or disagrees with its search.onnx is rejected."""
        spec = manifest.attention
        if kernel == "onnx" or spec is None:
            return None
        usable, why = kernel_available()
        if not usable:
            # Asked for by name (fused), its absence is worth a warning; under auto it is the expected fallback.
            log.log(logging.WARNING if kernel == "fused" else logging.INFO, "model %s: search.onnx (fused search unavailable: %s)", folder.name, why)
            return None
        path = folder / spec.file
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: np.ascontiguousarray(npz[name]) for name in ("item", "cate", "position_column")}
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFolderError(f"{path}: not a readable attention table file: {exc}") from None
        d = manifest.att_dim
        expected = {
            "item": (manifest.vocab.item_rows, d),
            "cate": (manifest.vocab.cate_rows, d),
            "position_column": (manifest.max_position + 1,),
        }
        for name, shape in expected.items():
            got = arrays[name]
            if got.dtype != np.float32 or got.shape != shape:
                raise ModelFolderError(f"{path}: {name} must be float32 {list(shape)}, is {got.dtype} {list(got.shape)}")
            if not np.isfinite(got[1:] if name == "position_column" else got).all():
                raise ModelFolderError(f"{path}: {name} holds NaN or infinite values")
        fused = cls(
            item=arrays["item"], cate=arrays["cate"], position_column=arrays["position_column"], scale=spec.scale,
            max_position=manifest.max_position, top_k=manifest.top_k,
        )  # fmt: skip
        fused.check_against(search, path)
        why = "DARE_SEARCH_PRECISION=float32"
        if precision != "float32" and not kernel_bf16():
            why = "no AVX-512 BF16 on this CPU"
            if precision == "bfloat16":
                log.warning("model %s: float32 pass 1 (DARE_SEARCH_PRECISION=bfloat16 needs AVX-512 BF16)", folder.name)
        elif precision != "float32":
            bf16 = fused.with_bf16()
            bf16.check_against(search, path)
            gain = fused.bf16_gain(bf16)
            why = f"bfloat16 measured {gain:.2f}x as fast"
            if precision == "bfloat16" or gain >= BF16_MIN_GAIN:
                fused = bf16
        log.info("model %s: fused search (%s, %s pass 1: %s)", folder.name, ISA_NAMES[kernel_isa()],
                 "bfloat16" if fused.bf16 else "float32", why)  # fmt: skip
        return fused

    def bf16_gain(self, bf16: FusedSearch) -> float:
        """How many times as fast `bf16` (this search with its pass 1 in bfloat16) runs as this one on a synthetic
        user of these tables: the best of a few alternating calls each."""
        rng = np.random.default_rng(1)
        rows, cates, n, c = self.item.shape[0], self.cate.shape[0], _TIMING_HISTORY, _TIMING_CANDIDATES
        args = (rng.integers(1, rows, n), rng.integers(1, cates, n), rng.integers(1, rows, c), rng.integers(1, cates, c))
        best = [float("inf"), float("inf")]
        for _ in range(_TIMING_ROUNDS):
            for i, variant in enumerate((self, bf16)):
                t0 = time.perf_counter()
                variant.run(*args)
                best[i] = min(best[i], time.perf_counter() - t0)
        return best[0] / best[1]

    def check_against(self, search: ort.InferenceSession, path: Path) -> None:
        """Score one synthetic user with both; the retrieved events and weights must agree."""
        rng = np.random.default_rng(0)
        rows, cates = self.item.shape[0], self.cate.shape[0]
        # Rows a request can carry: OOV (1) and up, never padding (0), whose zero row would make every event tie.
        feeds = {
            "hist_item": rng.integers(1, rows, _CHECK_HISTORY), "hist_cate": rng.integers(1, cates, _CHECK_HISTORY),
            "cand_item": rng.integers(1, rows, _CHECK_CANDIDATES), "cand_cate": rng.integers(1, cates, _CHECK_CANDIDATES),
        }  # fmt: skip
        want_index, want_weight = search.run(list(SEARCH_OUTPUTS), feeds)
        index, weight = self.run(feeds["hist_item"], feeds["hist_cate"], feeds["cand_item"], feeds["cand_cate"])
        def retrieved(idx: np.ndarray) -> np.ndarray:  # what the score graph reads of each retrieved event
            safe = np.maximum(idx, 0)
            position = np.minimum(_CHECK_HISTORY - safe, self.max_position)
            key = (feeds["hist_item"][safe] * cates + feeds["hist_cate"][safe]) * (self.max_position + 1) + position
            return np.sort(np.where(idx >= 0, key, -1), axis=1)

        # Events with equal scores (the same item and category, both past max_position) may be retrieved by either:
        # compare what the score graph reads of them, not their positions.
        same_sets = (retrieved(index) == retrieved(want_index)).all(axis=1).mean()
        weight_diff = float(np.abs(np.sort(weight, axis=1) - np.sort(want_weight, axis=1)).max())
        # Two events whose scores differ by a float32 rounding may trade places between the two; more than that is
        # a folder whose attention.npz and search.onnx do not hold the same model.
        if same_sets < 0.9 or weight_diff > _CHECK_WEIGHT_TOLERANCE:
            raise ModelFolderError(
                f"{path}: the attention tables disagree with search.onnx (same retrieved events for {same_sets:.0%} of "
                f"candidates, weights differ by up to {weight_diff:.2g}); re-export the model"
            )


class SearchSplitter:
    """Splits one long search over `threads` threads (DARE_SEARCH_THREADS) while its scoring call is the only one this
    process is running (`call` brackets each whole call: store read, search, scoring). A lone request then uses every
    core; under load, when calls overlap, each search runs in its own thread as before, so the split never takes
    cores from other requests.

    Where this process may run on at least `threads` CPUs, each pool thread is pinned to one of the last of them and
    the calling thread keeps off those CPUs while it splits; on one CPU it never splits (the threads would take
    turns). Left to the scheduler, a pool thread woken on an idle machine often starts on the caller's own CPU and
    the two share it (a Linux VM that packs threads onto few vCPUs did so in 15 of 20 splits): W3 att 16 took 9.7 ms
    split that way, 8.9 in one thread, 5.8 pinned."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        cpus = sorted(_affinity())
        pinned = threads > 1 and len(cpus) >= threads
        self.helper_cpus = cpus[len(cpus) - threads + 1 :] if pinned else []  # one per pool thread
        self.caller_cpus = set(cpus[: len(cpus) - threads + 1]) if pinned else set()
        helpers = iter(self.helper_cpus)
        initializer = (lambda: _pin({next(helpers)})) if pinned else None  # each pool thread, once, as it starts
        split = threads > 1 and len(cpus) != 1  # (no CPUs: the system does not say)
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="dare-search", initializer=initializer) if split else None
        self._lock = threading.Lock()
        self._calls = 0

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._lock:
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1

    def run(self, fused: FusedSearch, hist_item: np.ndarray, hist_cate: np.ndarray, cand_item: np.ndarray,
            cand_cate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        big = len(hist_item) * len(cand_item) >= SPLIT_MIN_WORK and len(cand_item) > CANDIDATE_TILE
        if self.pool is None or not big or self._calls > 1:
            return fused.run(hist_item, hist_cate, cand_item, cand_cate)
        before = _affinity() if self.caller_cpus else None
        if before:
            _pin(self.caller_cpus & before or before)
        try:
            return fused.run_split(hist_item, hist_cate, cand_item, cand_cate, self.pool, self.threads)
        finally:
            if before:
                _pin(before)

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def _affinity() -> set[int]:
    """The CPUs the calling thread may run on; empty where the system does not say (no sched_getaffinity)."""
    try:
        return os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else set()
    except OSError:
        return set()


def _pin(cpus: set[int]) -> None:
    """The calling thread's CPUs; a set the system refuses (a cpuset changed since) leaves them as they were."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        log.debug("search thread not pinned to %s: %s", sorted(cpus), exc)
