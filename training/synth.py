"""`dare synth`: a SYNTHETIC Taobao-format behaviour log with planted structure and its ground truth.

Nothing here is real user behaviour. The log feeds (a) retrieval-quality checks of the search stage against a known
truth and (b) lifelong sequences (10k-50k events per user) for the service benchmarks.

Generative process (C categories, I items, U users, N events per user, recency decay g in (0, 1)):
- items: Zipf popularity, weight of the item of popularity rank r is 1 / r**zipf; every item belongs to exactly one
  category (every category has at least one item);
- relation[t, c] >= 0: how strongly a behaviour of category c draws the next event to category t. Column c has
  relation[c, c] (repeat interest) and `related_per_category` other targets with random weights, normalised so
  that every column sums to 1;
- each user has `interests_per_user` interest categories with Dirichlet weights;
- event 0 and, with probability `explore`, any later event draw their category from the user's interests; otherwise
  event j draws its category t with probability

      P(t) = sum_i relation[t, c_i] * decay[p_i] / sum_i decay[p_i],   decay[p] = g**(p - 1),

  over the user's earlier events i (category c_i, position p_i = j - i, most recent = 1). This is sampled exactly
  in O(1) per event: pick the source behaviour by a geometric position truncated to the history, then a target
  category from that behaviour's relation column;
- the item is drawn within the chosen category by Zipf popularity; behaviour type is always `pv`; timestamps are
  sorted uniform draws inside the real file's window (2017-11-25 .. 2017-12-03), so `dare prepare` keeps every row.

The ground truth is written beside the log: `X.truth.npz` for `X.csv` or `X.csv.gz`, loaded with allow_pickle=False:

    synthetic      str             a sentence saying the data is synthetic
    cate_raw       int64 [C]       raw category id of relation index j (the ids used in the CSV)
    relation       float64 [C, C]  relation[t, c] as above (indices into cate_raw: target t, history category c)
    decay          float64 [N + 1] decay[p] for position p = 1..N (most recent = 1); decay[0] = 0 (no position 0)
    item_raw       int64 [I]       raw item ids ...
    item_cate_raw  int64 [I]       ... and the raw category of each
    item_weight    float64 [I]     Zipf popularity weight of each item
    config         str             the SynthConfig as JSON

so the relevance of history behaviour i to a target of category t is relation[t, c_i] * decay[p_i].
`dare prepare` copies it to DIR/truth.npz with `relation` remapped to category ROWS ([cate_rows, cate_rows]).
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dare_common import DareError
from training.config import PrepareConfig
from training.stages import StageProgress

SYNTHETIC_NOTE = "SYNTHETIC data written by `dare synth`: planted structure, not real user behaviour"
_PREPARE_DEFAULTS = PrepareConfig()


def truth_path_for(log: Path) -> Path:
    """Where `dare synth` writes the ground truth of `log`: X.csv or X.csv.gz -> X.truth.npz."""
    name = log.name
    for suffix in (".csv.gz", ".csv", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return log.with_name(name + ".truth.npz")


class SynthError(DareError):
    """An option of `dare synth` is out of range; the message names it."""


@dataclass(frozen=True)
class SynthConfig:
    users: int = 1000
    events_per_user: int = 200
    categories: int = 100
    items: int = 20000
    interests_per_user: int = 4
    related_per_category: int = 3
    decay: float = 0.9  # per position: decay[p] = decay ** (p - 1)
    explore: float = 0.2  # share of events drawn from the user's interests instead of through the relation
    zipf: float = 1.1
    seed: int = 0
    min_timestamp: int = _PREPARE_DEFAULTS.min_timestamp
    max_timestamp: int = _PREPARE_DEFAULTS.max_timestamp

    def check(self) -> None:
        for name in ("users", "events_per_user", "categories", "items", "interests_per_user"):
            if getattr(self, name) < 1:
                raise SynthError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.items < self.categories:
            raise SynthError(f"--items ({self.items}) must be >= --categories ({self.categories}): every category needs an item")
        if not 0 <= self.related_per_category < self.categories:
            raise SynthError(f"--related-per-category must be in [0, {self.categories - 1}], got {self.related_per_category}")
        if not 0.0 < self.decay < 1.0:
            raise SynthError(f"--decay must be in (0, 1), got {self.decay}")
        if not 0.0 <= self.explore <= 1.0:
            raise SynthError(f"--explore must be in [0, 1], got {self.explore}")
        if self.zipf < 0:
            raise SynthError(f"--zipf must be >= 0, got {self.zipf}")
        if self.max_timestamp - self.min_timestamp < 1:
            raise SynthError("the timestamp window is empty")


@dataclass
class SynthLog:
    """The generated events (user-major, chronological) and the ground truth."""

    user: np.ndarray  # int64 [U*N] raw user id
    item: np.ndarray  # int64 [U*N] raw item id
    cate: np.ndarray  # int64 [U*N] raw category id
    ts: np.ndarray  # int64 [U*N]
    truth: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.user)


def _distinct_ids(rng: np.random.Generator, n: int, floor: int) -> np.ndarray:
    """n distinct positive raw ids, deliberately not 0..n-1, so raw ids and vocabulary rows never coincide."""
    return rng.choice(max(10 * n, floor), size=n, replace=False).astype(np.int64) + 1


def _relation(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relation [C, C], per-column targets [C, 1+R], per-column target CDF [C, 1+R]); columns sum to 1."""
    c, r = cfg.categories, cfg.related_per_category
    # Each column: itself plus r distinct other categories (a random offset in 1..C-1 without repeats).
    offsets = np.argsort(rng.random((c, c - 1)), axis=1)[:, :r] + 1 if r else np.zeros((c, 0), dtype=np.int64)
    targets = np.concatenate([np.arange(c)[:, None], (np.arange(c)[:, None] + offsets) % c], axis=1)  # (C, 1+R)
    weights = np.concatenate([np.ones((c, 1)), rng.uniform(0.2, 1.0, (c, r))], axis=1)  # (C, 1+R)
    weights /= weights.sum(axis=1, keepdims=True)
    relation = np.zeros((c, c))
    relation[targets, np.arange(c)[:, None]] = weights  # relation[target, source column]
    cdf = np.cumsum(weights, axis=1)
    cdf[:, -1] = 1.0
    return relation, targets, cdf


def generate(cfg: SynthConfig, stages: StageProgress | None = None) -> SynthLog:
    """Draw the whole log; loops over the N event steps only, each vectorised over all users."""
    cfg.check()
    stages = stages or StageProgress(False)
    rng = np.random.default_rng(cfg.seed)
    u, n, c = cfg.users, cfg.events_per_user, cfg.categories

    with stages.stage("planted structure"):
        relation, col_targets, col_cdf = _relation(rng, cfg)
        interests = rng.integers(0, c, (u, cfg.interests_per_user))  # (U, K) may repeat: fine, weights add
        interest_cdf = np.cumsum(rng.dirichlet(np.ones(cfg.interests_per_user), u), axis=1)  # (U, K)
        interest_cdf[:, -1] = 1.0
        # Items: Zipf weight by a random popularity rank; the first C items cover every category once.
        item_weight = 1.0 / np.power(rng.permutation(cfg.items) + 1.0, cfg.zipf)  # (I,)
        item_cate = np.concatenate([rng.permutation(c), rng.integers(0, c, cfg.items - c)])  # (I,)
        by_cate = np.lexsort((np.arange(cfg.items), item_cate))  # item indices grouped by category
        grouped_cate = item_cate[by_cate]
        cum = np.cumsum(item_weight[by_cate])
        cate_total = np.bincount(grouped_cate, weights=item_weight[by_cate], minlength=c)  # (C,)
        cate_before = np.cumsum(cate_total) - cate_total
        # Category k's items occupy (k, k+1] on one axis, so "category k + uniform" picks one of its items.
        flat_cdf = grouped_cate + (cum - cate_before[grouped_cate]) / cate_total[grouped_cate]
        last_of_cate = np.r_[grouped_cate[1:] != grouped_cate[:-1], True]
        flat_cdf[last_of_cate] = grouped_cate[last_of_cate] + 1.0

    cats = np.empty((n, u), dtype=np.int64)  # (N, U) category index of event j of each user
    users = np.arange(u)
    log_g = np.log(cfg.decay)
    with stages.stage("draw categories", total=n) as advance:
        tick = max(1, n // 100)
        for j in range(n):
            interest = interests[users, (rng.random(u)[:, None] > interest_cdf).sum(axis=1)]  # (U,)
            if j == 0:
                cats[0] = interest
            else:
                # Source position p in 1..j with P(p) ∝ g**(p-1): inverse CDF of the truncated geometric.
                q = rng.random(u) * (1.0 - cfg.decay**j)
                p = np.clip(np.ceil(np.log1p(-q) / log_g), 1, j).astype(np.int64)  # (U,)
                source = cats[j - p, users]  # (U,) category of the chosen earlier behaviour
                k = (rng.random(u)[:, None] > col_cdf[source]).sum(axis=1)  # (U,) pick in that relation column
                related = col_targets[source, np.minimum(k, col_targets.shape[1] - 1)]
                cats[j] = np.where(rng.random(u) < cfg.explore, interest, related)
            if (j + 1) % tick == 0 or j + 1 == n:
                advance(tick if (j + 1) % tick == 0 else (j + 1) % tick)

    with stages.stage("draw items, timestamps"):
        cat_flat = cats.T.reshape(-1)  # (U*N,) user-major, chronological
        del cats
        pick = cat_flat + np.minimum(rng.random(len(cat_flat)), 1.0 - 1e-9)
        item_idx = by_cate[np.searchsorted(flat_cdf, pick, side="right")]  # (U*N,)
        ts = np.sort(rng.integers(cfg.min_timestamp, cfg.max_timestamp, (u, n)), axis=1).reshape(-1)
        user_raw = np.arange(1, u + 1, dtype=np.int64)
        item_raw = _distinct_ids(rng, cfg.items, 1_000_000)
        cate_raw = _distinct_ids(rng, c, 100_000)

    decay = np.zeros(n + 1)
    decay[1:] = cfg.decay ** np.arange(n)  # decay[p] = g**(p-1), p = 1..N
    truth = {
        "synthetic": np.array(SYNTHETIC_NOTE),
        "cate_raw": cate_raw,
        "relation": relation,
        "decay": decay,
        "item_raw": item_raw,
        "item_cate_raw": cate_raw[item_cate],
        "item_weight": item_weight,
        "config": np.array(json.dumps(asdict(cfg), sort_keys=True)),
    }
    return SynthLog(
        user=np.repeat(user_raw, n),
        item=item_raw[item_idx],
        cate=cate_raw[item_cate[item_idx]],
        ts=ts,
        truth=truth,
    )


@dataclass
class SynthResult:
    log: Path
    truth: Path
    rows: int
    seconds: float


def write_log(cfg: SynthConfig, out: Path, *, progress: bool = True) -> SynthResult:
    """Generate the log and write it (CSV, gzip if the name ends in .gz) and its truth file beside it."""
    cfg.check()
    out = Path(out)
    if not (out.name.endswith(".csv") or out.name.endswith(".csv.gz")):
        raise SynthError(f"--out {out}: the name must end in .csv or .csv.gz")
    if out.exists() and out.is_dir():
        raise SynthError(f"--out {out}: is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with StageProgress(progress) as stages:
        log = generate(cfg, stages)
        with stages.stage("write csv"):
            frame = pl.DataFrame(
                {"user": log.user, "item": log.item, "cate": log.cate, "behavior": "pv", "ts": log.ts}
            )
            if out.name.endswith(".gz"):
                # Level 1: the log is regenerated from its seed anyway, speed matters more than size.
                with gzip.open(out, "wb", compresslevel=1) as fh:
                    frame.write_csv(fh, include_header=False)
            else:
                frame.write_csv(out, include_header=False)
        truth = truth_path_for(out)
        np.savez(truth, **log.truth)
    return SynthResult(out, truth, log.rows, time.perf_counter() - start)
