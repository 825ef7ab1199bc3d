"""`dare train`: fit DARE / TWIN / TWIN-proj on a prepared-data folder, keep the best checkpoint, evaluate, save.

The recipe is the reference one (see /work/shared/DARE.md): Adam at lr 0.01, L2 1e-6 on the non-embedding weights
only, binary cross-entropy on the logits (the model returns logits; the loss lives here), an optional auxiliary
loss. The training set is evaluated on validation several times per epoch and the checkpoint with the best
validation AUC is kept; the test split is evaluated once, with that checkpoint. Every evaluation runs in
`model.eval()` — the reference never switches, so its BatchNorm normalises test batches with their own statistics.

metrics.json (written by `training.run.save_run`) holds the click metrics of val and test (AUC, per-user GAUC,
the reference's category GAUC, logloss), the retrieval NDCG@K of the search stage against ground truth (planted
on synthetic data, mutual information on real data; see training/metrics.py), the evaluation history, timings,
the full config and the data fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dare_common import DareError
from service.contract import PAD_INDEX, VOCAB_ARRAYS, VOCAB_FILE
from training.config import MODEL_KINDS, SEARCH_KINDS, ModelConfig, TrainConfig
from training.metrics import ClickMetrics, MutualInformationTruth, click_metrics, retrieval_ndcg, search_scores
from training.layout import SAMPLE_ARRAYS, FileMappings, LayoutError, Sequences
from training.memory import keep_step_memory_mapped, return_free_memory
from training.model import build_model, parameter_groups
from training.run import data_fingerprint, save_run

SPLITS = ("train", "val", "test")
SAMPLE_FIELDS = ("user", "seq_row", "position", "cand_item", "cand_cate", "label")  # the per-sample arrays of a Split
TRUTH_FILE = "truth.npz"
DATA_FORMAT_VERSION = 2  # training.prepare.FORMAT_VERSION: the layout of training/layout.py
META_FILE = "meta.json"
ITEM_CATE_FILE = "item_cate.npy"

# Training budget of `dare train` and `dare compare`: validation AUC is evaluated DEFAULT_EVALS_PER_EPOCH times per
# epoch, and training stops after DEFAULT_PATIENCE evaluations without a new best (one epoch's worth), or at
# DEFAULT_EPOCHS epochs, whichever comes first; the best checkpoint is kept. One fixed epoch count cannot be right
# for both a 10k-sample file (which overfits after one epoch) and a 100M-row one (which is still improving after
# two), so the data decides. The rule is the same for every model.
DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 128
DEFAULT_PATIENCE = 4
DEFAULT_EVALS_PER_EPOCH = 4
PRECISIONS = ("fp32", "bf16")
# Retrieval NDCG is averaged over at most this many test impressions (a seeded subset) to bound its cost.
NDCG_MAX_IMPRESSIONS = 50_000
# The mutual-information truth (real data) is estimated from at most this many training samples (a seeded subset).
MI_MAX_ROWS = 200_000
# An evaluation pass drops the folder's mapped pages from the process and returns the heap's free pages to the kernel
# every this many batches (training/memory.py): a pass over 1M samples otherwise maps the whole folder and leaves
# fragments behind.
RELEASE_EVERY_BATCHES = 32
# The best checkpoint is copied in memory up to this many bytes of weights; a larger model spills it to RUN/.best.pt.
BEST_IN_MEMORY_MAX_BYTES = 256 << 20
BEST_SPILL_FILE = ".best.pt"


class TrainError(DareError):
    """A prepared-data folder or a training option is unusable."""


# ---------------------------------------------------------------------------------------------------------------
# Options and data
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """What `dare train` and `dare compare` ask for; turned into a ModelConfig + TrainConfig once the data is read."""

    model: str = "dare"
    att_dim: int = 16
    repr_dim: int | None = None  # None: same as att_dim
    top_k: int = 20
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 0.01
    l2: float = 1e-6
    seed: int = 0
    aux_loss: bool = True
    aux_weight: float = 1.0
    device: str = "auto"
    evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH
    patience: int = DEFAULT_PATIENCE
    search: str = "topk"
    precision: str = "fp32"  # "bf16": autocast the forward passes to bfloat16 (CUDA, or CPU where torch supports it)
    max_samples: int | None = None  # stop after this many training samples (a budget for very large data)
    # Sparse embedding gradients and a lazy Adam (torch.optim.SparseAdam) for the embedding tables: a step touches
    # only the rows in the batch. Off by default: the reference's dense Adam also moves rows absent from the batch
    # (their moments decay), so the two are different optimisers (docs/scale.md).
    sparse_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise TrainError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise TrainError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.model not in MODEL_KINDS:
            raise TrainError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_KINDS)}")
        if self.search not in SEARCH_KINDS:
            raise TrainError(f"unknown --search {self.search!r}; choose one of {', '.join(SEARCH_KINDS)}")
        repr_dim = self.att_dim if self.repr_dim is None else self.repr_dim
        if self.model != "dare" and repr_dim != self.att_dim:
            raise TrainError(
                f"--model {self.model} has one shared embedding table, so --att-dim ({self.att_dim}) and "
                f"--repr-dim ({repr_dim}) must be equal; only dare decouples them"
            )
        positive = {"att_dim": self.att_dim, "repr_dim": repr_dim, "top_k": self.top_k, "epochs": self.epochs,
                    "batch_size": self.batch_size, "evals_per_epoch": self.evals_per_epoch,
                    "patience": self.patience}  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        if self.l2 < 0 or self.aux_weight < 0:
            raise TrainError("l2 and aux_weight must be >= 0")

    def same_as_recorded(self, recorded: object) -> bool:
        """Whether a run's recorded options (metrics.json "options") are these. Options added after the run was
        recorded count as equal when they are at their defaults (the run used the behaviour they default to)."""
        if not isinstance(recorded, dict):
            return False
        mine = json.loads(json.dumps(asdict(self)))
        defaults = json.loads(json.dumps(asdict(TrainOptions())))
        return set(recorded) <= set(mine) and all(
            recorded[k] == v if k in recorded else v == defaults[k] for k, v in mine.items()
        )

    @property
    def resolved_repr_dim(self) -> int:
        return self.att_dim if self.repr_dim is None else self.repr_dim


@dataclass(frozen=True)
class Split:
    """One prepared split: per sample the user, the target's position in the user's sequence and the candidates;
    histories are sliced from the shared `sequences` when a batch asks for them (training/layout.py). The arrays
    are memory-mapped on disk (int32 rows, uint8 labels) or in memory; every accessor returns int64 / float32."""

    name: str
    user: np.ndarray  # [S] user row (per-user GAUC)
    seq_row: np.ndarray  # [S] the sample's sequence in `sequences` (the user row itself in a prepared folder)
    position: np.ndarray  # [S] the target's index within that sequence
    cand_item: np.ndarray  # [S, C]
    cand_cate: np.ndarray  # [S, C]
    label: np.ndarray  # [S, C] 0 / 1
    sequences: Sequences = field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.user)

    def histories(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hist_item, hist_cate int64 [len(rows), L] of the given samples."""
        return self.sequences.histories(self.seq_row[rows], self.position[rows])

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        """hist_item, hist_cate [B, L], cand_item, cand_cate [B, C] (int64 tensors on `device`)."""
        hist_item, hist_cate = self.histories(rows)
        arrays = (hist_item, hist_cate, self.cand_item[rows].astype(np.int64), self.cand_cate[rows].astype(np.int64))
        return tuple(torch.from_numpy(a).to(device) for a in arrays)

    def labels(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(rows), C] labels (all rows when `rows` is None)."""
        return np.asarray(self.label if rows is None else self.label[rows], dtype=np.float32)

    # Whole-split histories: for small data only (the model-free baselines, tests); training slices per batch.
    @property
    def hist_item(self) -> np.ndarray:
        return self.histories(np.arange(self.rows))[0]

    @property
    def hist_cate(self) -> np.ndarray:
        return self.histories(np.arange(self.rows))[1]

    def subset(self, rows: np.ndarray) -> Split:
        """The samples `rows` (in that order), over the same sequences."""
        return dataclasses.replace(self, **{name: np.asarray(getattr(self, name)[rows]) for name in SAMPLE_FIELDS})

    @classmethod
    def from_histories(cls, name: str, user: np.ndarray, hist_item: np.ndarray, hist_cate: np.ndarray,
                       cand_item: np.ndarray, cand_cate: np.ndarray, label: np.ndarray) -> Split:  # fmt: skip
        """A split from left-padded [S, L] histories (tests, hand-made data): each sample gets its own sequence of
        its non-padding events followed by its target (the positive candidate)."""
        hist_item, hist_cate = np.asarray(hist_item, np.int64), np.asarray(hist_cate, np.int64)
        s, length = hist_item.shape
        valid = hist_item != PAD_INDEX  # [S, L] left-padded: the valid events are each row's tail
        if np.any(valid[:, :-1] & ~valid[:, 1:]):
            raise ValueError("from_histories: histories must be left-padded (no padding after a real event)")
        counts = valid.sum(axis=1)  # [S]
        seq_item = np.concatenate([np.concatenate([h[v], c[:1]]) for h, v, c in zip(hist_item, valid, cand_item)]) if s else np.zeros(0, np.int64)
        seq_cate = np.concatenate([np.concatenate([h[v], c[:1]]) for h, v, c in zip(hist_cate, valid, cand_cate)]) if s else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts + 1)]).astype(np.int64)  # [S+1]
        sequences = Sequences(seq_item, seq_cate, np.zeros(len(seq_item), np.int64), offsets, length)
        return cls(name, np.asarray(user, np.int64), np.arange(s, dtype=np.int64), counts.astype(np.int64), np.asarray(cand_item, np.int64),
                   np.asarray(cand_cate, np.int64), np.asarray(label, np.float32), sequences)  # fmt: skip


@dataclass(frozen=True)
class PlantedTruth:
    """Synthetic data's planted relevance: relation[target category row, behaviour category row] * decay[position]."""

    relation: np.ndarray  # float [cate_rows, cate_rows]
    decay: np.ndarray  # float [P + 1], indexed by position (1 = most recent); positions past P use decay[P]

    def relevance(self, hist_cate: np.ndarray, target_cate: np.ndarray) -> np.ndarray:
        """hist_cate [R, L] (left-padded), target_cate [R] -> relevance [R, L], 0 on padding."""
        length = hist_cate.shape[1]
        position = np.minimum(length - np.arange(length), len(self.decay) - 1)  # [L]
        rel = self.relation[target_cate[:, None], hist_cate] * self.decay[position][None, :]  # [R, L]
        return np.where(hist_cate != 0, rel, 0.0)


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    train: Split
    val: Split
    test: Split
    item_rows: int
    cate_rows: int
    history_len: int
    fingerprint: str
    synthetic: bool
    planted: PlantedTruth | None = None
    meta: dict[str, object] = field(default_factory=dict)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise TrainError(f"{path.parent}: missing {path.name} (is this a folder written by `dare prepare`?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: not a readable .npz file: {exc}") from None


# Range checks over the sample arrays run this many samples at a time, so they never double a large split in memory.
CHECK_CHUNK = 1 << 22


def _load_split(folder: Path, name: str, sequences: Sequences, item_rows: int, cate_rows: int) -> Split:
    try:
        mappings = sequences.mappings if sequences.mappings is not None else FileMappings()
        arrays = {a: mappings.open(folder / name / f"{a}.npy") for a in SAMPLE_ARRAYS}
    except LayoutError as exc:
        raise TrainError(f"{folder}: {exc} (is this a folder written by `dare prepare`?)") from None
    user, position, cand_item, cand_cate, label = (arrays[a] for a in SAMPLE_ARRAYS)
    where = f"{folder / name}/"
    s = len(user)
    if s == 0:
        raise TrainError(f"{where} holds no samples")
    if user.ndim != 1 or position.shape != user.shape:
        raise TrainError(f"{where}: user and position must both be [S]")
    if cand_item.ndim != 2 or cand_item.shape != cand_cate.shape or cand_item.shape != label.shape or cand_item.shape[0] != s:
        raise TrainError(f"{where}: cand_item, cand_cate and label must all be [S, C]")
    lengths = np.diff(sequences.offsets)  # [U]
    for a in range(0, s, CHECK_CHUNK):
        b = min(s, a + CHECK_CHUNK)
        u, p = np.asarray(user[a:b], np.int64), np.asarray(position[a:b], np.int64)
        if u.min() < 0 or u.max() >= sequences.users:
            raise TrainError(f"{where}user.npy refers to users beyond sequences/offsets.npy ({sequences.users} users)")
        if p.min() < 0 or np.any(p >= lengths[u]):
            raise TrainError(f"{where}position.npy points past a user's sequence")
        ci, cc, lab = cand_item[a:b], cand_cate[a:b], label[a:b]
        if min(ci.min(), cc.min()) < 0 or ci.max() >= item_rows or cc.max() >= cate_rows:
            raise TrainError(f"{where} refers to item or category rows beyond {VOCAB_FILE}")
        if not np.isin(lab, (0, 1)).all():
            raise TrainError(f"{where}label.npy must hold only 0 and 1")
    return Split(name, user, user, position, cand_item, cand_cate, label, sequences)


def load_prepared(folder: Path) -> PreparedData:
    """Open and check a prepared-data folder (arrays memory-mapped); raise TrainError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainError(f"data folder {folder} does not exist (write one with `dare prepare --out {folder}`)")
    if not (folder / META_FILE).is_file():
        # prepare writes meta.json last, so without it the folder is incomplete (or not a prepared-data folder).
        raise TrainError(f"{folder}: no {META_FILE}, so not a complete prepared-data folder (run `dare prepare`)")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{folder / META_FILE}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise TrainError(f"{folder / META_FILE}: must hold a JSON object")
    if meta.get("format_version") != DATA_FORMAT_VERSION:
        raise TrainError(
            f"{folder}: prepared-data format {meta.get('format_version')!r}, this code reads format {DATA_FORMAT_VERSION} "
            "(sequences stored once, samples pointing into them); run `dare prepare` again into this folder"
        )
    history_len = meta.get("history_len")
    if not isinstance(history_len, int) or history_len < 1:
        raise TrainError(f"{folder / META_FILE}: history_len must be a positive integer, got {history_len!r}")
    vocab = _load_npz(folder / VOCAB_FILE)
    if any(a not in vocab for a in VOCAB_ARRAYS):
        raise TrainError(f"{folder / VOCAB_FILE} must hold arrays {VOCAB_ARRAYS}")
    item_rows = int(max(vocab["item_index"].max(initial=1), 1)) + 1
    cate_rows = int(max(vocab["cate_index"].max(initial=1), 1)) + 1
    if (folder / ITEM_CATE_FILE).is_file():
        item_rows = max(item_rows, len(np.load(folder / ITEM_CATE_FILE, allow_pickle=False)))
    try:
        sequences = Sequences.open(folder, history_len)
    except LayoutError as exc:
        raise TrainError(f"{folder}: {exc} (is this a folder written by `dare prepare`?)") from None
    for values, rows, what in ((sequences.item, item_rows, "item"), (sequences.cate, cate_rows, "category")):
        for a in range(0, len(values), CHECK_CHUNK):
            chunk = values[a : a + CHECK_CHUNK]
            if chunk.min() < 1 or chunk.max() >= rows:
                raise TrainError(f"{folder}/sequences holds {what} rows outside 1..{rows - 1} ({VOCAB_FILE})")
    splits = {name: _load_split(folder, name, sequences, item_rows, cate_rows) for name in SPLITS}
    sequences.release_pages()  # the checks read every page once; training touches what it needs
    planted = None
    if (folder / TRUTH_FILE).is_file():
        truth = _load_npz(folder / TRUTH_FILE)
        if "relation" not in truth or "decay" not in truth:
            raise TrainError(f"{folder / TRUTH_FILE} must hold arrays 'relation' and 'decay'")
        relation = np.asarray(truth["relation"], dtype=np.float64)
        if relation.ndim != 2 or relation.shape[0] < cate_rows or relation.shape[1] < cate_rows:
            raise TrainError(f"{folder / TRUTH_FILE}: relation must be [cate_rows, cate_rows] with cate_rows = {cate_rows}")
        planted = PlantedTruth(relation=relation, decay=np.asarray(truth["decay"], dtype=np.float64).reshape(-1))
    return PreparedData(
        folder=folder,
        item_rows=item_rows,
        cate_rows=cate_rows,
        history_len=history_len,
        fingerprint=data_fingerprint(folder),
        synthetic=planted is not None or bool(meta.get("synthetic", False)),
        planted=planted,
        meta=meta,
        **splits,
    )


def subsample_train(data: PreparedData, fraction: float, seed: int = 0) -> PreparedData:
    """The same data with the training split cut to the samples of a `fraction` of its users (a seeded draw, the
    same for every model); validation and test are untouched, so results on different fractions are comparable."""
    if not 0 < fraction <= 1:
        raise TrainError(f"a training fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return data
    users = np.unique(data.train.user)
    keep = np.random.default_rng(seed).permutation(users)[: max(1, math.ceil(fraction * len(users)))]
    rows = np.flatnonzero(np.isin(data.train.user, keep))
    return dataclasses.replace(data, train=data.train.subset(rows))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {requested}: CUDA is not available on this machine (use cpu or auto)")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise TrainError(f"--device {requested!r} is not a device torch knows (use auto, cpu or cuda)") from None


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forward pass's autocast context: bf16 where asked (CUDA, and CPU where torch supports it), else off."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """Logits [S, C] for a whole split, in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    out = []
    split.sequences.release_pages()  # what training mapped; the pass maps its own pages as it goes
    for i, start in enumerate(range(0, split.rows, batch_size)):
        rows = np.arange(start, min(start + batch_size, split.rows))
        with autocast(device, precision):
            logits = model(*split.batch(rows, device))
        out.append(logits.float().cpu().numpy())  # [b, C]
        if (i + 1) % RELEASE_EVERY_BATCHES == 0:
            split.sequences.release_pages()
            return_free_memory()
    split.sequences.release_pages()
    return_free_memory()
    return np.concatenate(out)


def evaluate_clicks(
    model: nn.Module, split: Split, batch_size: int, device: torch.device, precision: str = "fp32"
) -> ClickMetrics:
    logits = predict(model, split, batch_size, device, precision)
    return click_metrics(np.asarray(split.user, np.int64), np.asarray(split.cand_cate, np.int64), split.labels(), logits)


RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # hist_cate [R, L], target_cate [R] -> [R, L]


def retrieval_truth(data: PreparedData) -> tuple[str, RelevanceFn]:
    """The ground truth the search is scored against: planted (synthetic data) or mutual information (real data).

    The mutual information is estimated from the training split with a fixed seed, so that every run on the same
    data is scored against the same truth.
    """
    if data.planted is not None:
        return "planted", data.planted.relevance
    train = data.train
    if train.rows > MI_MAX_ROWS:  # the subset MutualInformationTruth.fit would draw, sliced before the histories are
        train = train.subset(np.sort(np.random.default_rng(0).choice(train.rows, size=MI_MAX_ROWS, replace=False)))
    mi = MutualInformationTruth.fit(train.hist_cate, np.asarray(train.cand_cate, np.int64), train.labels(),
                                    data.cate_rows, max_rows=MI_MAX_ROWS, seed=0)  # fmt: skip
    return "mutual_information", mi.relevance


def _ndcg_rows(split: Split) -> np.ndarray:
    """The split rows whose impressions are scored (all, or a fixed subset of NDCG_MAX_IMPRESSIONS)."""
    candidates = split.cand_item.shape[1]
    if split.rows * candidates <= NDCG_MAX_IMPRESSIONS:
        return np.arange(split.rows)
    return np.sort(np.random.default_rng(0).choice(split.rows, NDCG_MAX_IMPRESSIONS // candidates, replace=False))


def _mean_ndcg(
    data: PreparedData, split: Split, k: int, batch_size: int, rank: Callable[[np.ndarray], np.ndarray]
) -> tuple[str, float | None, int]:
    """Mean NDCG@k over the split's scored impressions of the ranking `rank(chunk rows) -> scores [b*C, L]`."""
    truth_name, relevance = retrieval_truth(data)
    candidates = split.cand_item.shape[1]
    rows = _ndcg_rows(split)
    total, used = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        hist_cate = np.repeat(split.histories(chunk)[1], candidates, axis=0)  # [b*C, L]: each candidate sees the history
        truth = relevance(hist_cate, np.asarray(split.cand_cate[chunk], np.int64).reshape(-1))  # [b*C, L]
        value, n = retrieval_ndcg(truth, rank(chunk), k)
        if n:
            total += value * n
            used += n
    return truth_name, (total / used if used else None), used


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module, data: PreparedData, split: Split, batch_size: int, device: torch.device
) -> dict[str, object]:
    """NDCG@K of the search stage over the split's impressions against the data's ground truth."""
    k = int(model.cfg.top_k)
    candidates = split.cand_item.shape[1]
    model.eval()

    def search_rank(chunk: np.ndarray) -> np.ndarray:
        index, weight = model.search(*split.batch(chunk, device))  # [b, C, K] each
        b = len(chunk)
        return search_scores(index.cpu().numpy().reshape(b * candidates, k),
                             weight.float().cpu().numpy().reshape(b * candidates, k), data.history_len)  # [b*C, L]  # fmt: skip

    truth_name, ndcg, used = _mean_ndcg(data, split, k, batch_size, search_rank)
    return {"ndcg_at_k": ndcg, "ndcg_k": k, "ndcg_truth": truth_name, "ndcg_impressions": used}


def retrieval_baselines(data: PreparedData, split: Split, k: int, batch_size: int = 1024) -> dict[str, float | None]:
    """NDCG@k of two model-free rankings, for scale: the k most recent behaviours, and k at random (seeded)."""
    candidates = split.cand_item.shape[1]
    rng = np.random.default_rng(0)

    def recency(chunk: np.ndarray) -> np.ndarray:
        hist = np.repeat(split.histories(chunk)[1], candidates, axis=0)  # [b*C, L]
        return np.where(hist != 0, np.arange(hist.shape[1], dtype=np.float64)[None, :], -1.0)  # later = more recent

    def random(chunk: np.ndarray) -> np.ndarray:
        hist = np.repeat(split.histories(chunk)[1], candidates, axis=0)  # [b*C, L]
        return np.where(hist != 0, rng.random(hist.shape), -1.0)

    return {
        "recency": _mean_ndcg(data, split, k, batch_size, recency)[1],
        "random": _mean_ndcg(data, split, k, batch_size, random)[1],
    }


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


class BestCheckpoint:
    """Keeps the weights with the highest validation AUC seen so far (first one wins ties): a copy in memory, or, with
    `spill`, a file (for large embedding tables, so the copy costs disk instead of RAM; read back memory-mapped)."""

    def __init__(self, spill: Path | None = None) -> None:
        self.auc = -math.inf
        self.step = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.spill = spill

    def offer(self, model: nn.Module, auc: float, step: int) -> bool:
        if not auc > self.auc:  # NaN never wins
            return False
        self.auc, self.step = auc, step
        if self.spill is None:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            partial = self.spill.with_name(self.spill.name + ".partial")
            torch.save(model.state_dict(), partial)
            partial.replace(self.spill)
        return True

    def restore(self, model: nn.Module) -> None:
        if self.step < 0:
            raise TrainError("no checkpoint was evaluated (training ran zero steps)")
        if self.spill is None:
            model.load_state_dict(self.state)  # type: ignore[arg-type]
        else:
            model.load_state_dict(torch.load(self.spill, map_location="cpu", weights_only=True, mmap=True))

    def discard(self) -> None:
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)


def eval_steps(steps_per_epoch: int, epochs: int, evals_per_epoch: int) -> set[int]:
    """The 1-based global steps after which validation runs: evenly spaced, always including each epoch's end."""
    per_epoch = min(evals_per_epoch, steps_per_epoch)
    marks = {round(steps_per_epoch * (i + 1) / per_epoch) for i in range(per_epoch)}
    return {epoch * steps_per_epoch + m for epoch in range(epochs) for m in marks}


def build_configs(options: TrainOptions, data: PreparedData) -> TrainConfig:
    model_cfg = ModelConfig(
        kind=options.model,  # type: ignore[arg-type]
        item_rows=data.item_rows,
        cate_rows=data.cate_rows,
        att_dim=options.att_dim,
        repr_dim=options.resolved_repr_dim,
        top_k=options.top_k,
        max_position=data.history_len,
        aux_loss=options.aux_loss,
        search=options.search,  # type: ignore[arg-type]
    )
    return TrainConfig(
        model=model_cfg,
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        l2=options.l2,
        aux_weight=options.aux_weight,
        seed=options.seed,
        device=options.device,
        extra={"evals_per_epoch": options.evals_per_epoch, "patience": options.patience},
    )


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, object]
    model: nn.Module = field(repr=False)


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_optimizers(model: nn.Module, options: TrainOptions) -> list[torch.optim.Optimizer]:
    """Adam at `lr`; its weight_decay (the classic, coupled L2 penalty's gradient) on the dense weights only.
    With `sparse_embeddings`, the embedding tables produce sparse gradients and get torch.optim.SparseAdam."""
    embedding, dense = parameter_groups(model)  # type: ignore[arg-type]
    # foreach=True (torch's default on CUDA only): the same arithmetic as the per-parameter loop, bit for bit, but
    # updated in place, so a step allocates one temporary per parameter instead of three; over dense embedding
    # tables that is the larger part of a CPU step's memory traffic (docs/scale.md, throughput).
    if not options.sparse_embeddings:
        return [torch.optim.Adam(
            [{"params": embedding, "weight_decay": 0.0}, {"params": dense, "weight_decay": options.l2}], lr=options.lr,
            foreach=True,
        )]  # fmt: skip
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for table in tables:
        table.sparse = True  # the public constructor flag, read by every forward
    table_ids = {id(t.weight) for t in tables}
    rows = [p for p in embedding if id(p) in table_ids]
    other = [p for p in embedding if id(p) not in table_ids]  # e.g. the target's position vector: dense, no L2
    return [
        torch.optim.SparseAdam(rows, lr=options.lr),
        torch.optim.Adam([{"params": other, "weight_decay": 0.0}, {"params": dense, "weight_decay": options.l2}], lr=options.lr,
                         foreach=True),
    ]


def _weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, value in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of one global batch (the shares differ in size by at most one row)."""
        return np.array_split(rows, self.world)[self.rank] if self.world > 1 else rows

    def broadcast_flag(self, value: bool, device: torch.device) -> bool:
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        flag = torch.tensor([1 if value else 0], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def gather(self, value: object) -> list[object]:
        if self.world == 1:
            return [value]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], loss_fn: nn.Module, split: Split,
               rows: np.ndarray, device: torch.device, options: TrainOptions) -> float:
    """One optimisation step on the samples `rows` of `split`; returns the loss. The weights are not updated when the
    loss is not finite (the caller stops). `docs/scale/step_bench.py` times this function."""
    hist_item, hist_cate, cand_item, cand_cate = split.batch(rows, device)
    label = torch.from_numpy(split.labels(rows)).to(device)  # [B, C]
    model.train()
    with autocast(device, options.precision):
        if options.aux_loss:
            logits, aux_logits = model(hist_item, hist_cate, cand_item, cand_cate, with_aux=True)  # [B, C] each
            loss = loss_fn(logits.float(), label) + options.aux_weight * loss_fn(aux_logits.float(), label)
        else:
            logits = model(hist_item, hist_cate, cand_item, cand_cate)  # [B, C]
            loss = loss_fn(logits.float(), label)
    value = loss.item()
    if not math.isfinite(value):
        return value
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return value


def train(
    data: PreparedData | Path,
    options: TrainOptions,
    out_dir: Path,
    *,
    progress: bool = True,
    position: int = 0,
) -> TrainResult:
    """Train one model, evaluate it, write the run folder (weights, config.json, metrics.json); return the metrics.

    Under torchrun (a torch.distributed process group is initialised; see training/distributed.py) every rank runs
    this function: the model is wrapped in DistributedDataParallel, every rank draws the same permutation per epoch
    and trains on its share of each global batch of `batch_size` samples, so the sample stream, the steps per epoch
    and the evaluation schedule are those of one process. Rank 0 alone evaluates validation (the whole set) and
    broadcasts the early-stopping decision, evaluates test and writes the run folder; other ranks return metrics {}.
    """
    keep_step_memory_mapped()
    if not isinstance(data, PreparedData):
        data = load_prepared(Path(data))
    return_free_memory()  # the loader's temporaries (vocabulary, range checks), kept by the thresholds just set
    ranks = Ranks.current()
    device = resolve_device(options.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    cfg = build_configs(options, data)
    seed_everything(options.seed)
    module = build_model(cfg.model).to(device)
    initial_digest = _weights_digest(module)  # before DDP broadcasts rank 0's weights: the seed alone decides them
    optimizers = build_optimizers(module, options)  # before the DDP wrap: it must see which gradients are sparse
    model: nn.Module = (
        DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                find_unused_parameters=options.search == "recency")  # recency: no search gradient
        if ranks.world > 1 else module
    )  # fmt: skip
    loss_fn = nn.BCEWithLogitsLoss()
    shuffle = np.random.default_rng(options.seed)

    train_rows = data.train.rows
    # A last batch smaller than the number of ranks cannot give every rank a row: it is skipped (only then).
    full, rest = divmod(train_rows, options.batch_size)
    steps_per_epoch = full + (1 if rest >= max(ranks.world, 1) else 0)
    total_steps = steps_per_epoch * options.epochs
    if options.max_samples is not None:
        total_steps = min(total_steps, math.ceil(options.max_samples / options.batch_size))
    evaluate_at = eval_steps(steps_per_epoch, options.epochs, options.evals_per_epoch)
    eval_batch = max(options.batch_size, 1024)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    best = BestCheckpoint(Path(out_dir) / BEST_SPILL_FILE if weight_bytes > BEST_IN_MEMORY_MAX_BYTES else None)
    history: list[dict[str, float | int]] = []
    step, samples_seen, rank_samples, running_loss, since_best = 0, 0, 0, 0.0, 0
    stop_reason = "max_epochs"
    eval_seconds = 0.0
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"train {options.model} att{options.att_dim}/repr{options.resolved_repr_dim}",
               unit="step", disable=not (progress and ranks.main), position=position, leave=position == 0,
               dynamic_ncols=True)  # fmt: skip

    def validate() -> bool:
        """Rank 0 evaluates the whole validation split; every rank learns whether to stop (patience)."""
        nonlocal since_best, eval_seconds
        stop = False
        if ranks.main:
            eval_started = time.perf_counter()
            val = evaluate_clicks(module, data.val, eval_batch, device, options.precision)
            improved = best.offer(module, val.auc, step)
            if improved:
                best_val.append(val)  # the best checkpoint's validation metrics: not recomputed at the end
            since_best = 0 if improved else since_best + 1
            history.append({"step": step, "epoch": round(step / steps_per_epoch, 3), "samples_seen": samples_seen,
                            "train_loss": running_loss, "val_auc": val.auc, "val_gauc": val.gauc,
                            "val_logloss": val.logloss})  # fmt: skip
            bar.set_postfix(loss=f"{running_loss:.4f}", val_auc=f"{val.auc:.4f}", best=f"{best.auc:.4f}" + ("*" if improved else ""))
            stop = since_best >= options.patience
            eval_seconds += time.perf_counter() - eval_started
        return ranks.broadcast_flag(stop, device)

    best_val: list[ClickMetrics] = []
    evaluated_last = False
    for epoch in range(options.epochs):
        order = shuffle.permutation(train_rows)
        for start in range(0, train_rows, options.batch_size):
            batch_rows = order[start : start + options.batch_size]
            if len(batch_rows) < ranks.world:
                continue  # see steps_per_epoch
            rows = ranks.shard(batch_rows)
            loss = train_step(model, optimizers, loss_fn, data.train, rows, device, options)
            if not math.isfinite(loss):
                raise TrainError(f"the loss became {loss} at step {step + 1}; try a smaller --lr")
            step += 1
            samples_seen += len(batch_rows)
            rank_samples += len(rows)
            running_loss = 0.9 * running_loss + 0.1 * loss if step > 1 else loss
            bar.update(1)
            evaluated_last = step in evaluate_at
            if evaluated_last and validate():
                stop_reason = "patience"
                break
            if options.max_samples is not None and samples_seen >= options.max_samples:
                stop_reason = "max_samples"
                break
        if stop_reason != "max_epochs":
            break
    if step and not evaluated_last:  # a sample budget ended training between two evaluations
        validate()
    bar.close()
    train_seconds = time.perf_counter() - started
    # Per rank: the samples it trained on, and digests of its weights at the start (before DistributedDataParallel
    # copies rank 0's) and after the last step: equal digests across ranks = same seed, synchronised gradients.
    rank_report = ranks.gather({"rank": ranks.rank, "samples": rank_samples, "initial_weights_sha256": initial_digest,
                                "final_weights_sha256": _weights_digest(module)})  # fmt: skip
    if not ranks.main:
        return TrainResult(run_dir=Path(out_dir), metrics={}, model=module)

    best.restore(module)
    val = best_val[-1]
    test = evaluate_clicks(module, data.test, eval_batch, device, options.precision)
    retrieval = evaluate_retrieval(module, data, data.test, eval_batch, device)
    step_seconds = train_seconds - eval_seconds
    metrics: dict[str, object] = {
        "test_auc": test.auc,
        "test_gauc": test.gauc,
        "test_gauc_users": test.gauc_users,
        "test_category_gauc": test.category_gauc,
        "test_logloss": test.logloss,
        "test_impressions": test.impressions,
        "test_ndcg_at_k": retrieval["ndcg_at_k"],
        "ndcg_k": retrieval["ndcg_k"],
        "ndcg_truth": retrieval["ndcg_truth"],
        "ndcg_impressions": retrieval["ndcg_impressions"],
        "val_auc": val.auc,
        "val_gauc": val.gauc,
        "val_category_gauc": val.category_gauc,
        "val_logloss": val.logloss,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "train_samples_seen": samples_seen,
        # Training samples per second of training steps alone (validation passes excluded), all ranks together.
        "train_samples_per_second": round(samples_seen / step_seconds, 1) if step_seconds > 0 else None,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "train_rows": train_rows,
        "best_step": best.step,
        "best_epoch": round(best.step / steps_per_epoch, 3),
        # "patience": no better validation AUC in `patience` evaluations; "max_epochs": the cap; "max_samples": the budget
        "stop_reason": stop_reason,
        "patience": options.patience,
        "max_epochs": options.epochs,
        "evals": history,
        "device": str(device),
        "precision": options.precision,
        "sparse_embeddings": options.sparse_embeddings,
        "processes": ranks.world,
        "ranks": rank_report,
        "torch_version": torch.__version__,
        "data_dir": str(data.folder),
        "data_fingerprint": data.fingerprint,
        "synthetic_data": data.synthetic,
        "config": cfg.to_dict(),
        "options": asdict(options),
    }
    out_dir = Path(out_dir)
    save_run(out_dir, module, cfg, metrics, data.folder)
    best.discard()
    return TrainResult(run_dir=out_dir, metrics=metrics, model=module)
