"""Evaluation metrics: click-prediction quality (AUC, GAUC, logloss) and retrieval quality (NDCG@K of the search).

Click metrics work on flat impression arrays: one entry per (sample row, candidate column) of a prepared split.

- `auc`: the global ROC AUC (scikit-learn).
- `user_gauc`: per-user AUC averaged with weight = the user's number of impressions; users whose impressions are all
  one class have no AUC and are skipped (and leave the weights' denominator too). The industry's usual "GAUC".
- `category_gauc`: the same, grouped by the *target's category*. This is what the reference code calls "GAUC"; it
  is reported under its own name so nobody mistakes it for the per-user metric.
- `logloss`: binary cross-entropy of the predicted probabilities (scikit-learn).

Retrieval quality asks whether the search stage retrieves the behaviours that matter for the target. It is the
NDCG@K (scikit-learn `ndcg_score`, linear gains) of the model's top-K ranking of one history against a ground-truth
relevance of every history position:

- synthetic data: the planted relevance (`truth.npz`, see training/synth.py);
- real data: `MutualInformationTruth`, the paper's ground truth, estimated from the training split (below).

Mutual-information truth. For a target of category t, let Y be the click label and X_{c,b} the indicator "the
history holds at least one behaviour of category c whose position falls in bucket b". We count, over every training
impression (row, candidate) whose target category is t, how many have X_{c,b} = 1 with Y = 1 and with Y = 0, and the
totals of Y = 1 and Y = 0; the relevance of (t, c, b) is the empirical mutual information I(X_{c,b}; Y | T = t) in
bits, from that 2x2 table. The authors' analysis script does the same with exact positions and counts on the full
Taobao file (100M rows); on small data exact positions leave almost every cell with a count of 0 or 1, so positions
are bucketed on a log2 scale (1 | 2-3 | 4-7 | 8-15 | ...; the most recent behaviour is position 1), which keeps the
recency signal where it is sharpest. Targets whose category has fewer than `min_target_impressions` training
impressions get no truth (the reference skips targets with fewer than 700 samples for the same reason: the estimate
is noise), and history rows whose truth is all zero are skipped, since NDCG is undefined for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from dare_common import DareError

# A pad column in a prepared history holds item/category row 0.
PAD = 0


def _flat(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        raise DareError(f"{name} is empty: nothing to evaluate")
    return arr


def _check_lengths(**arrays: np.ndarray) -> None:
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise DareError(f"metric inputs must have one entry per impression, got lengths {sizes}")


def _check_binary(labels: np.ndarray) -> None:
    if not np.isin(labels, (0, 1)).all():
        raise DareError("labels must be 0 or 1")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Global ROC AUC; needs both classes present."""
    labels, scores = _flat("labels", labels), _flat("scores", scores)
    _check_lengths(labels=labels, scores=scores)
    _check_binary(labels)
    if labels.min() == labels.max():
        raise DareError("AUC needs both clicked and non-clicked impressions; the labels hold only one class")
    return float(roc_auc_score(labels, scores))


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """AUC per group, averaged with weight = the group's impression count; single-class groups are skipped.

    Returns (weighted mean AUC, number of groups used); the mean is NaN when no group has both classes.
    Each group's AUC is the Mann-Whitney statistic from tie-averaged ranks, identical to scikit-learn's
    roc_auc_score on that group (a test checks it), but computed for all groups at once: a Python loop over
    thousands of users or categories would dominate every validation pass.
    """
    groups, labels, scores = _flat("groups", groups), _flat("labels", labels), _flat("scores", scores)
    _check_lengths(groups=groups, labels=labels, scores=scores)
    _check_binary(labels)
    order = np.lexsort((scores, groups))  # by group, then score ascending
    g, s, y = groups[order], scores[order], labels[order].astype(np.float64)
    n = len(g)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_id = np.cumsum(new_group) - 1  # [n] 0..G-1
    group_start = np.flatnonzero(new_group)[group_id]  # [n] index where each element's group begins
    rank = np.arange(n) - group_start + 1.0  # [n] 1-based rank within the group
    # Ties (same group and score) share the mean of their ranks.
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    rank = (np.bincount(tie_id, weights=rank) / np.bincount(tie_id))[tie_id]
    size = np.bincount(group_id).astype(np.float64)  # [G]
    n_pos = np.bincount(group_id, weights=y)  # [G]
    n_neg = size - n_pos
    rank_sum_pos = np.bincount(group_id, weights=rank * y)  # [G]
    usable = (n_pos > 0) & (n_neg > 0)
    if not usable.any():
        return float("nan"), 0
    group_auc = (rank_sum_pos[usable] - n_pos[usable] * (n_pos[usable] + 1) / 2) / (n_pos[usable] * n_neg[usable])
    return float(np.sum(size[usable] * group_auc) / np.sum(size[usable])), int(usable.sum())


def user_gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by each user's impression count (users with one class skipped)."""
    return grouped_auc(users, labels, scores)[0]


def category_gauc(target_cates: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """The reference code's "GAUC": AUC grouped by the target's category, weighted by group size."""
    return grouped_auc(target_cates, labels, scores)[0]


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    labels, probs = _flat("labels", labels), _flat("probs", probs)
    _check_lengths(labels=labels, probs=probs)
    _check_binary(labels)
    return float(log_loss(labels, probs.astype(np.float64), labels=[0, 1]))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # Written in the form that never overflows exp() for large |logit|.
    x = np.asarray(logits, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


@dataclass(frozen=True)
class ClickMetrics:
    auc: float
    gauc: float  # per user, impression-weighted
    gauc_users: int  # users that had both classes
    category_gauc: float  # the reference code's "GAUC" (grouped by target category)
    logloss: float
    impressions: int


def click_metrics(users: np.ndarray, target_cates: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> ClickMetrics:
    """All click metrics for one split. Arrays are [S, C] (user broadcast from [S]) or already flat."""
    labels = np.asarray(labels)
    logits = np.asarray(logits)
    if labels.shape != logits.shape:
        raise DareError(f"labels {labels.shape} and logits {logits.shape} must have the same shape")
    users = np.asarray(users)
    if labels.ndim == 2 and users.ndim == 1:
        users = np.broadcast_to(users[:, None], labels.shape)  # [S] -> [S, C]: every candidate of a row is the user's
    probs = sigmoid(logits)
    gauc, gauc_users = grouped_auc(users, labels, logits)
    return ClickMetrics(
        auc=auc(labels, logits),
        gauc=gauc,
        gauc_users=gauc_users,
        category_gauc=category_gauc(target_cates, labels, logits),
        logloss=logloss(labels, probs),
        impressions=int(labels.size),
    )


def retrieval_ndcg(truth: np.ndarray, scores: np.ndarray, k: int) -> tuple[float, int]:
    """Mean NDCG@k of ranking each row's positions by `scores` against relevance `truth`, both [R, L].

    Rows whose truth is all zero are skipped (NDCG is undefined there). Returns (mean NDCG, rows used); NaN if none.
    """
    truth = np.asarray(truth, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != scores.shape:
        raise DareError(f"truth {truth.shape} and scores {scores.shape} must both be [rows, positions]")
    if k < 1:
        raise DareError(f"k must be >= 1, got {k}")
    if (truth < 0).any():
        raise DareError("retrieval truth must be non-negative")
    keep = truth.max(axis=1) > 0
    if not keep.any():
        return float("nan"), 0
    if truth.shape[1] < 2:
        # sklearn's ndcg_score refuses a single position; with one candidate position any ranking is ideal.
        return 1.0, int(keep.sum())
    return float(ndcg_score(truth[keep], scores[keep], k=k)), int(keep.sum())


def search_scores(topk_index: np.ndarray, topk_weight: np.ndarray, length: int) -> np.ndarray:
    """Turn a search result (top-K positions and their weights, [R, K]) into a score per position, [R, L].

    Retrieved positions score 1 + weight (so they outrank everything else, in the order of their weights); every
    other position scores 0. Index -1 marks padding (a history shorter than K) and is ignored.
    """
    topk_index = np.asarray(topk_index)
    topk_weight = np.asarray(topk_weight, dtype=np.float64)
    if topk_index.shape != topk_weight.shape or topk_index.ndim != 2:
        raise DareError(f"topk_index {topk_index.shape} and topk_weight {topk_weight.shape} must both be [rows, K]")
    if (topk_index >= length).any():
        raise DareError(f"topk_index holds a position >= the history length {length}")
    scores = np.zeros((topk_index.shape[0], length), dtype=np.float64)  # [R, L]
    rows, cols = np.nonzero(topk_index >= 0)
    scores[rows, topk_index[rows, cols]] = 1.0 + topk_weight[rows, cols]
    return scores


def position_bucket(position: np.ndarray) -> np.ndarray:
    """Log2 bucket of a 1-based position: 1 -> 0, 2-3 -> 1, 4-7 -> 2, 8-15 -> 3, ..."""
    position = np.asarray(position, dtype=np.int64)
    if (position < 1).any():
        raise DareError("positions are 1-based (the most recent behaviour is position 1)")
    return np.floor(np.log2(position)).astype(np.int64)


def _mutual_information(x_pos: np.ndarray, x_neg: np.ndarray, t_pos: np.ndarray, t_neg: np.ndarray) -> np.ndarray:
    """I(X; Y) in bits from 2x2 counts: X=1 with Y=1 / Y=0, and the totals of Y=1 / Y=0 (all arrays alike)."""
    n = t_pos + t_neg
    cells = [  # (joint count, count of X's value, count of Y's value)
        (x_pos, x_pos + x_neg, t_pos),
        (x_neg, x_pos + x_neg, t_neg),
        (t_pos - x_pos, n - x_pos - x_neg, t_pos),
        (t_neg - x_neg, n - x_pos - x_neg, t_neg),
    ]
    mi = np.zeros(np.broadcast(x_pos, t_pos).shape, dtype=np.float64)
    for joint, marg_x, marg_y in cells:
        joint = np.asarray(joint, dtype=np.float64)
        ok = joint > 0  # 0 * log 0 = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            term = joint / n * np.log2(joint * n / (marg_x * marg_y))
        mi += np.where(ok, term, 0.0)
    return np.maximum(mi, 0.0)  # rounding can leave -1e-17 where the true value is 0


@dataclass(frozen=True)
class MutualInformationTruth:
    """I(X_{c,b}; Y | target category t) for every (t, c, b) seen in training; see the module docstring."""

    keys: np.ndarray  # int64 [Q], sorted: (t * cate_rows + c) * buckets + b
    mi: np.ndarray  # float64 [Q]
    target_impressions: np.ndarray  # int64 [cate_rows]: training impressions per target category
    cate_rows: int
    buckets: int
    history_len: int
    min_target_impressions: int

    @classmethod
    def fit(
        cls,
        hist_cate: np.ndarray,
        cand_cate: np.ndarray,
        label: np.ndarray,
        cate_rows: int,
        *,
        min_target_impressions: int = 50,
        max_rows: int = 200_000,
        chunk_rows: int = 8_192,
        seed: int = 0,
    ) -> MutualInformationTruth:
        """Estimate from training arrays: hist_cate [S, L], cand_cate [S, C], label [S, C].

        At most `max_rows` rows (a seeded random subset) are used, so the estimate stays cheap on the full data set.
        """
        hist_cate = np.asarray(hist_cate)
        cand_cate = np.asarray(cand_cate)
        label = np.asarray(label)
        if hist_cate.ndim != 2 or cand_cate.ndim != 2 or cand_cate.shape != label.shape:
            raise DareError(
                f"expected hist_cate [S, L], cand_cate and label [S, C]; got {hist_cate.shape}, "
                f"{cand_cate.shape}, {label.shape}"
            )
        if len(hist_cate) != len(cand_cate):
            raise DareError(f"hist_cate has {len(hist_cate)} rows but cand_cate has {len(cand_cate)}")
        if max(int(hist_cate.max(initial=0)), int(cand_cate.max(initial=0))) >= cate_rows:
            raise DareError(f"a category row is >= cate_rows ({cate_rows})")
        if len(hist_cate) > max_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(hist_cate), size=max_rows, replace=False))
            hist_cate, cand_cate, label = hist_cate[pick], cand_cate[pick], label[pick]
        length = hist_cate.shape[1]
        # Column j of a left-padded history is position L - j (most recent = 1).
        col_bucket = position_bucket(length - np.arange(length))  # [L]
        buckets = int(col_bucket.max()) + 1
        is_pos = label > 0.5  # [S, C]

        key_parts_pos: list[tuple[np.ndarray, np.ndarray]] = []
        key_parts_neg: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(hist_cate), chunk_rows):
            hc = hist_cate[start : start + chunk_rows]  # [s, L]
            cb = hc.astype(np.int64) * buckets + col_bucket[None, :]  # [s, L] (c, b) key
            cb = np.where(hc == PAD, -1, cb)
            # X is presence, not a count: keep each (c, b) once per row.
            cb = np.sort(cb, axis=1)
            dup = np.zeros_like(cb, dtype=bool)
            dup[:, 1:] = cb[:, 1:] == cb[:, :-1]
            cb = np.where(dup, -1, cb)
            valid = cb >= 0  # [s, L]
            for j in range(cand_cate.shape[1]):
                t = cand_cate[start : start + chunk_rows, j].astype(np.int64)  # [s]
                full = t[:, None] * (cate_rows * buckets) + cb  # [s, L] (t, c, b) key
                pos_rows = is_pos[start : start + chunk_rows, j][:, None]  # [s, 1]
                for parts, mask in ((key_parts_pos, valid & pos_rows), (key_parts_neg, valid & ~pos_rows)):
                    parts.append(np.unique(full[mask], return_counts=True))

        def reduce(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
            keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.int64)
            counts = np.concatenate([c for _, c in parts]) if parts else np.zeros(0, np.int64)
            uniq, inverse = np.unique(keys, return_inverse=True)
            return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)

        pos_keys, pos_counts = reduce(key_parts_pos)
        neg_keys, neg_counts = reduce(key_parts_neg)
        keys = np.union1d(pos_keys, neg_keys)
        x_pos = np.zeros(len(keys), np.int64)
        x_neg = np.zeros(len(keys), np.int64)
        x_pos[np.searchsorted(keys, pos_keys)] = pos_counts
        x_neg[np.searchsorted(keys, neg_keys)] = neg_counts

        flat_t = cand_cate.reshape(-1).astype(np.int64)
        flat_pos = is_pos.reshape(-1)
        t_pos_all = np.bincount(flat_t[flat_pos], minlength=cate_rows)
        t_neg_all = np.bincount(flat_t[~flat_pos], minlength=cate_rows)
        key_t = keys // (cate_rows * buckets)
        mi = _mutual_information(x_pos, x_neg, t_pos_all[key_t], t_neg_all[key_t])
        return cls(
            keys=keys,
            mi=mi,
            target_impressions=(t_pos_all + t_neg_all).astype(np.int64),
            cate_rows=cate_rows,
            buckets=buckets,
            history_len=length,
            min_target_impressions=min_target_impressions,
        )

    def relevance(self, hist_cate: np.ndarray, target_cate: np.ndarray) -> np.ndarray:
        """Truth for each history position: hist_cate [R, L] and target_cate [R] -> relevance [R, L] (bits).

        Pad positions, unseen (t, c, b) and targets below `min_target_impressions` get 0.
        """
        hist_cate = np.asarray(hist_cate).astype(np.int64)
        target_cate = np.asarray(target_cate).astype(np.int64)
        if hist_cate.ndim != 2 or target_cate.shape != (hist_cate.shape[0],):
            raise DareError(f"expected hist_cate [R, L] and target_cate [R]; got {hist_cate.shape}, {target_cate.shape}")
        length = hist_cate.shape[1]
        col_bucket = np.minimum(position_bucket(length - np.arange(length)), self.buckets - 1)  # [L]
        in_range = (target_cate >= 0) & (target_cate < self.cate_rows)
        safe_t = np.where(in_range, target_cate, 0)
        key = (safe_t[:, None] * self.cate_rows + hist_cate) * self.buckets + col_bucket[None, :]  # [R, L]
        idx = np.clip(np.searchsorted(self.keys, key), 0, max(len(self.keys) - 1, 0))
        found = (self.keys[idx] == key) if len(self.keys) else np.zeros(key.shape, bool)
        rel = np.where(found, self.mi[idx] if len(self.keys) else 0.0, 0.0)
        supported = in_range & (self.target_impressions[safe_t] >= self.min_target_impressions)  # [R]
        rel = np.where((hist_cate != PAD) & supported[:, None], rel, 0.0)
        return rel
