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
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dare_common import DareError
from service.contract import VOCAB_ARRAYS, VOCAB_FILE
from training.config import MODEL_KINDS, SEARCH_KINDS, ModelConfig, TrainConfig
from training.metrics import ClickMetrics, MutualInformationTruth, click_metrics, retrieval_ndcg, search_scores
from training.model import build_model, parameter_groups
from training.run import data_fingerprint, save_run

SPLITS = ("train", "val", "test")
SPLIT_ARRAYS = ("user", "hist_item", "hist_cate", "cand_item", "cand_cate", "label")
TRUTH_FILE = "truth.npz"
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
# Retrieval NDCG is averaged over at most this many test impressions (a seeded subset) to bound its cost.
NDCG_MAX_IMPRESSIONS = 50_000


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

    def __post_init__(self) -> None:
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

    @property
    def resolved_repr_dim(self) -> int:
        return self.att_dim if self.repr_dim is None else self.repr_dim


@dataclass(frozen=True)
class Split:
    """One prepared split, as numpy arrays (see training/config.py for the shapes)."""

    name: str
    user: np.ndarray  # int64 [S]
    hist_item: np.ndarray  # int64 [S, L]
    hist_cate: np.ndarray  # int64 [S, L]
    cand_item: np.ndarray  # int64 [S, C]
    cand_cate: np.ndarray  # int64 [S, C]
    label: np.ndarray  # float32 [S, C]

    @property
    def rows(self) -> int:
        return len(self.user)


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


def _load_split(folder: Path, name: str) -> Split:
    arrays = _load_npz(folder / f"{name}.npz")
    missing = [a for a in SPLIT_ARRAYS if a not in arrays]
    if missing:
        raise TrainError(f"{folder / name}.npz lacks arrays {missing}")
    user, hist_item, hist_cate = arrays["user"], arrays["hist_item"], arrays["hist_cate"]
    cand_item, cand_cate, label = arrays["cand_item"], arrays["cand_cate"], arrays["label"]
    s = len(user)
    if s == 0:
        raise TrainError(f"{folder / name}.npz holds no samples")
    if user.ndim != 1 or hist_item.ndim != 2 or hist_item.shape != hist_cate.shape or hist_item.shape[0] != s:
        raise TrainError(f"{folder / name}.npz: user must be [S] and hist_item/hist_cate [S, L]")
    if cand_item.ndim != 2 or cand_item.shape != cand_cate.shape or cand_item.shape != label.shape or cand_item.shape[0] != s:
        raise TrainError(f"{folder / name}.npz: cand_item, cand_cate and label must all be [S, C]")
    if not np.isin(label, (0, 1)).all():
        raise TrainError(f"{folder / name}.npz: label must hold only 0 and 1")
    as_int = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in
              (("user", user), ("hist_item", hist_item), ("hist_cate", hist_cate), ("cand_item", cand_item), ("cand_cate", cand_cate))}  # fmt: skip
    return Split(name=name, label=np.ascontiguousarray(label, dtype=np.float32), **as_int)


def load_prepared(folder: Path) -> PreparedData:
    """Read and check a prepared-data folder; raise TrainError naming what is wrong."""
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
    splits = {name: _load_split(folder, name) for name in SPLITS}
    lengths = {name: s.hist_item.shape[1] for name, s in splits.items()}
    if len(set(lengths.values())) != 1:
        raise TrainError(f"{folder}: the splits have different history lengths {lengths}")
    vocab = _load_npz(folder / VOCAB_FILE)
    if any(a not in vocab for a in VOCAB_ARRAYS):
        raise TrainError(f"{folder / VOCAB_FILE} must hold arrays {VOCAB_ARRAYS}")
    item_rows = int(max(vocab["item_index"].max(initial=1), 1)) + 1
    cate_rows = int(max(vocab["cate_index"].max(initial=1), 1)) + 1
    if (folder / ITEM_CATE_FILE).is_file():
        item_rows = max(item_rows, len(np.load(folder / ITEM_CATE_FILE, allow_pickle=False)))
    for s in splits.values():
        if max(s.hist_item.max(), s.cand_item.max()) >= item_rows or max(s.hist_cate.max(), s.cand_cate.max()) >= cate_rows:
            raise TrainError(f"{folder}/{s.name}.npz refers to item or category rows beyond {VOCAB_FILE}")
        if min(s.hist_item.min(), s.cand_item.min(), s.hist_cate.min(), s.cand_cate.min()) < 0:
            raise TrainError(f"{folder}/{s.name}.npz holds negative rows")
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
        history_len=lengths["train"],
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
    train = Split(name=data.train.name, **{name: getattr(data.train, name)[rows] for name in SPLIT_ARRAYS})
    return dataclasses.replace(data, train=train)


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


def _batches(split: Split, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(getattr(split, name)[rows]).to(device)
        for name in ("hist_item", "hist_cate", "cand_item", "cand_cate")
    )


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits [S, C] for a whole split, in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    out = []
    for start in range(0, split.rows, batch_size):
        rows = np.arange(start, min(start + batch_size, split.rows))
        out.append(model(*_batches(split, rows, device)).float().cpu().numpy())  # [b, C]
    return np.concatenate(out)


def evaluate_clicks(model: nn.Module, split: Split, batch_size: int, device: torch.device) -> ClickMetrics:
    logits = predict(model, split, batch_size, device)
    return click_metrics(split.user, split.cand_cate, split.label, logits)


RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # hist_cate [R, L], target_cate [R] -> [R, L]


def retrieval_truth(data: PreparedData) -> tuple[str, RelevanceFn]:
    """The ground truth the search is scored against: planted (synthetic data) or mutual information (real data).

    The mutual information is estimated from the training split with a fixed seed, so that every run on the same
    data is scored against the same truth.
    """
    if data.planted is not None:
        return "planted", data.planted.relevance
    mi = MutualInformationTruth.fit(data.train.hist_cate, data.train.cand_cate, data.train.label, data.cate_rows, seed=0)
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
        hist_cate = np.repeat(split.hist_cate[chunk], candidates, axis=0)  # [b*C, L]: each candidate sees the history
        truth = relevance(hist_cate, split.cand_cate[chunk].reshape(-1))  # [b*C, L]
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
        index, weight = model.search(*_batches(split, chunk, device))  # [b, C, K] each
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
        hist = np.repeat(split.hist_cate[chunk], candidates, axis=0)  # [b*C, L]
        return np.where(hist != 0, np.arange(hist.shape[1], dtype=np.float64)[None, :], -1.0)  # later = more recent

    def random(chunk: np.ndarray) -> np.ndarray:
        hist = np.repeat(split.hist_cate[chunk], candidates, axis=0)  # [b*C, L]
        return np.where(hist != 0, rng.random(hist.shape), -1.0)

    return {
        "recency": _mean_ndcg(data, split, k, batch_size, recency)[1],
        "random": _mean_ndcg(data, split, k, batch_size, random)[1],
    }


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


class BestCheckpoint:
    """Keeps a copy of the weights with the highest validation AUC seen so far (first one wins ties)."""

    def __init__(self) -> None:
        self.auc = -math.inf
        self.step = -1
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, auc: float, step: int) -> bool:
        if not auc > self.auc:  # NaN never wins
            return False
        self.auc, self.step = auc, step
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> None:
        if self.state is None:
            raise TrainError("no checkpoint was evaluated (training ran zero steps)")
        model.load_state_dict(self.state)


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


def train(
    data: PreparedData | Path,
    options: TrainOptions,
    out_dir: Path,
    *,
    progress: bool = True,
    position: int = 0,
) -> TrainResult:
    """Train one model, evaluate it, write the run folder (weights, config.json, metrics.json); return the metrics."""
    if not isinstance(data, PreparedData):
        data = load_prepared(Path(data))
    device = resolve_device(options.device)
    cfg = build_configs(options, data)
    seed_everything(options.seed)
    model = build_model(cfg.model).to(device)
    embedding, dense = parameter_groups(model)
    # Adam's weight_decay is the classic (coupled) L2 penalty's gradient, applied to the dense weights only.
    optimizer = torch.optim.Adam(
        [{"params": embedding, "weight_decay": 0.0}, {"params": dense, "weight_decay": options.l2}], lr=options.lr
    )
    loss_fn = nn.BCEWithLogitsLoss()
    shuffle = np.random.default_rng(options.seed)

    steps_per_epoch = math.ceil(data.train.rows / options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    evaluate_at = eval_steps(steps_per_epoch, options.epochs, options.evals_per_epoch)
    best = BestCheckpoint()
    history: list[dict[str, float | int]] = []
    step, running_loss, since_best = 0, 0.0, 0
    stop_reason = "max_epochs"
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"train {options.model} att{options.att_dim}/repr{options.resolved_repr_dim}",
               unit="step", disable=not progress, position=position, leave=position == 0, dynamic_ncols=True)  # fmt: skip
    for epoch in range(options.epochs):
        order = shuffle.permutation(data.train.rows)
        for start in range(0, data.train.rows, options.batch_size):
            rows = order[start : start + options.batch_size]
            hist_item, hist_cate, cand_item, cand_cate = _batches(data.train, rows, device)
            label = torch.from_numpy(data.train.label[rows]).to(device)  # [B, C]
            model.train()
            if options.aux_loss:
                logits, aux_logits = model.forward_with_aux(hist_item, hist_cate, cand_item, cand_cate)  # [B, C] each
                loss = loss_fn(logits, label) + options.aux_weight * loss_fn(aux_logits, label)
            else:
                logits = model(hist_item, hist_cate, cand_item, cand_cate)  # [B, C]
                loss = loss_fn(logits, label)
            if not torch.isfinite(loss):
                raise TrainError(f"the loss became {loss.item()} at step {step + 1}; try a smaller --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running_loss = 0.9 * running_loss + 0.1 * loss.item() if step > 1 else loss.item()
            bar.update(1)
            if step in evaluate_at:
                val = evaluate_clicks(model, data.val, max(options.batch_size, 1024), device)
                improved = best.offer(model, val.auc, step)
                since_best = 0 if improved else since_best + 1
                history.append({"step": step, "epoch": round(step / steps_per_epoch, 3),
                                "samples_seen": min(step * options.batch_size, (epoch + 1) * data.train.rows),
                                "train_loss": running_loss, "val_auc": val.auc, "val_gauc": val.gauc,
                                "val_logloss": val.logloss})  # fmt: skip
                bar.set_postfix(loss=f"{running_loss:.4f}", val_auc=f"{val.auc:.4f}", best=f"{best.auc:.4f}" + ("*" if improved else ""))
                if since_best >= options.patience:
                    stop_reason = "patience"
                    break
        if stop_reason == "patience":
            break
    bar.close()
    train_seconds = time.perf_counter() - started

    best.restore(model)
    eval_batch = max(options.batch_size, 1024)
    val = evaluate_clicks(model, data.val, eval_batch, device)
    test = evaluate_clicks(model, data.test, eval_batch, device)
    retrieval = evaluate_retrieval(model, data, data.test, eval_batch, device)
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
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "train_rows": data.train.rows,
        "best_step": best.step,
        "best_epoch": round(best.step / steps_per_epoch, 3),
        "stop_reason": stop_reason,  # "patience": no better validation AUC in `patience` evaluations; "max_epochs": the cap
        "patience": options.patience,
        "max_epochs": options.epochs,
        "evals": history,
        "device": str(device),
        "torch_version": torch.__version__,
        "data_dir": str(data.folder),
        "data_fingerprint": data.fingerprint,
        "synthetic_data": data.synthetic,
        "config": cfg.to_dict(),
        "options": asdict(options),
    }
    out_dir = Path(out_dir)
    save_run(out_dir, model, cfg, metrics, data.folder)
    return TrainResult(run_dir=out_dir, metrics=metrics, model=model)
