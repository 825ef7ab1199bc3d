"""Model-free baselines: reference points scored on the same test impressions as the neural models.

A neural model's AUC means little alone; these say what the data gives away without learning a representation.
Every baseline scores each (test sample, candidate) pair, higher = more likely clicked, and is evaluated with the
same flattening and metrics as `training.train.evaluate_clicks` (global AUC and per-user GAUC). Statistics are fit
on the training split only; test labels are never read except to score, and validation is not used at all.

- random: a seeded uniform score; AUC ~0.5, the floor.
- popularity: how often the candidate item occurs in the training split, counting every non-padding history event
  of every training sample plus every training positive target. Overlapping histories of one user are counted once
  per sample that holds the event, which weights recent events a little more; items unseen in training score 0.
- inverse popularity: minus popularity. `dare prepare` draws negatives in proportion to item frequency, so negatives
  are popular items and a positive is often a rarer one: this measures how much the sampler gives away.
- candidate in history: how often the candidate item occurs in this sample's own history. By construction negatives
  never occur anywhere in the user's sequence, so any repeat marks the positive. It looks like a leak but is a
  legitimate signal of the protocol (the models see the same history), and it bounds what "search" has to find.
- category share of history: the fraction of the sample's history events whose category is the candidate's; the
  category-level interest that DIN-style attention captures.
- item co-occurrence: count(a -> b) of item b following item a within CO_WINDOW events in a training sequence
  (a training history followed by its positive target), normalised by all pairs starting at a, so a row is
  P(b follows soon | a). A candidate scores the sum over its sample's last CO_WINDOW history items; the
  "people who viewed a next viewed b" signal.
- logistic regression: scikit-learn's, scaled, over log1p(popularity), log1p(candidate in history), category share
  and co-occurrence, fit on all candidates of the training samples with their labels. Popularity and
  co-occurrence of a training impression are *cross-fitted*: computed from the other half of the training users, so
  a training positive never counts itself (in-sample it would: its own target and this user's later histories
  inflate its popularity, teaching the regression the opposite of what holds on test).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import reduce
from operator import add

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training.metrics import PAD, auc, user_gauc
from training.train import PreparedData, Split

# Co-occurrence window: an item "follows" another when it comes 1..CO_WINDOW events later.
CO_WINDOW = 5
# Rows per chunk: bounds the [rows, L, C] comparisons and the pair arrays on large data.
CHUNK_ROWS = 4096
BASELINE_NAMES = (
    "random",
    "popularity",
    "inverse popularity",
    "candidate in history",
    "category share of history",
    "item co-occurrence",
    "logistic regression",
)


@dataclass(frozen=True)
class BaselineResult:
    name: str
    test_auc: float
    test_gauc: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ItemStatistics:
    """What the item-level baselines learn from training sequences (histories followed by their positive target)."""

    popularity: np.ndarray  # float64 [item_rows]
    follow: sparse.csr_matrix  # [item_rows, item_rows]: P(b within CO_WINDOW after a); row 0 (pad) empty

    @classmethod
    def fit(cls, split: Split, item_rows: int) -> ItemStatistics:
        sequences = np.concatenate([split.hist_item, split.cand_item[:, :1]], axis=1)  # [S, L+1]: column 0 = positive
        popularity = np.bincount(sequences[sequences != PAD], minlength=item_rows).astype(np.float64)
        merged, pending = sparse.csr_matrix((item_rows, item_rows)), []
        for start in range(0, len(sequences), CHUNK_ROWS):
            chunk = sequences[start : start + CHUNK_ROWS]
            earlier = np.concatenate([chunk[:, :-d].ravel() for d in range(1, CO_WINDOW + 1)])
            later = np.concatenate([chunk[:, d:].ravel() for d in range(1, CO_WINDOW + 1)])
            keep = (earlier != PAD) & (later != PAD)
            # csr_matrix sums duplicate (a, b) entries; merge only when pending outgrows merged (amortised cost).
            pending.append(sparse.csr_matrix((np.ones(keep.sum()), (earlier[keep], later[keep])), shape=merged.shape))
            if sum(p.nnz for p in pending) >= merged.nnz:
                merged, pending = reduce(add, pending, merged), []
        counts = reduce(add, pending, merged)
        starts = np.asarray(counts.sum(axis=1)).ravel()  # [item_rows] pairs starting at each item
        follow = sparse.diags(1.0 / np.maximum(starts, 1.0)) @ counts
        return cls(popularity=popularity, follow=sparse.csr_matrix(follow))


def count_in_history(history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For history [S, L] and candidates [S, C]: how often each candidate occurs in its row's history (pad ignored)."""
    out = np.empty(candidates.shape, np.float64)
    for start in range(0, len(history), CHUNK_ROWS):
        h = history[start : start + CHUNK_ROWS, :, None]  # [s, L, 1]
        c = candidates[start : start + CHUNK_ROWS, None, :]  # [s, 1, C]
        out[start : start + CHUNK_ROWS] = ((h == c) & (h != PAD)).sum(axis=1)
    return out


def category_share(split: Split) -> np.ndarray:
    events = (split.hist_cate != PAD).sum(axis=1, keepdims=True)  # [S, 1]
    return count_in_history(split.hist_cate, split.cand_cate) / np.maximum(events, 1)


def cooccurrence(split: Split, stats: ItemStatistics) -> np.ndarray:
    """Sum over the sample's last CO_WINDOW history items a of P(candidate follows a); pad rows of `follow` are 0."""
    score = np.zeros(split.cand_item.shape, np.float64)  # [S, C]
    candidates = split.cand_item.ravel()
    for recent in split.hist_item[:, -CO_WINDOW:].T:  # one column of the window at a time, [S]
        earlier = np.repeat(recent, split.cand_item.shape[1])  # [S*C], row-major like `candidates`
        score += np.asarray(stats.follow[earlier, candidates]).reshape(score.shape)
    return score


def features(split: Split, stats: ItemStatistics) -> np.ndarray:
    """The logistic regression's inputs, one row per impression (row-major over [S, C]): [S*C, 4]."""
    columns = (
        np.log1p(stats.popularity[split.cand_item]),
        np.log1p(count_in_history(split.hist_item, split.cand_item)),
        category_share(split),
        cooccurrence(split, stats),
    )
    return np.stack([c.ravel() for c in columns], axis=1)




def cross_fitted_features(train: Split, item_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Training features whose item statistics come from the other half of the training users (2 folds by user)."""
    users = np.unique(train.user)
    fold_of_user = np.empty(len(users), np.int64)
    fold_of_user[rng.permutation(len(users))] = np.arange(len(users)) % 2
    fold = fold_of_user[np.searchsorted(users, train.user)]  # [S]
    out = np.empty((train.label.size, 4), np.float64)
    per_row = train.label.shape[1]
    for k in (0, 1):
        rows = np.flatnonzero(fold == k)
        stats = ItemStatistics.fit(train.subset(np.flatnonzero(fold != k)), item_rows)
        impressions = (rows[:, None] * per_row + np.arange(per_row)).ravel()  # row-major positions of these rows
        out[impressions] = features(train.subset(rows), stats)
    return out


def logistic_regression(data: PreparedData, stats: ItemStatistics, rng: np.random.Generator) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(cross_fitted_features(data.train, data.item_rows, rng), data.train.labels().ravel())
    return model.decision_function(features(data.test, stats)).reshape(data.test.label.shape)


def baseline_scores(data: PreparedData, seed: int = 0) -> dict[str, np.ndarray]:
    """Every baseline's test scores, [S, C] each, keyed by BASELINE_NAMES in order."""
    random_rng, fold_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    test = data.test
    stats = ItemStatistics.fit(data.train, data.item_rows)
    popularity = stats.popularity[test.cand_item]
    scores = (
        random_rng.random(test.cand_item.shape),
        popularity,
        -popularity,
        count_in_history(test.hist_item, test.cand_item),
        category_share(test),
        cooccurrence(test, stats),
        logistic_regression(data, stats, fold_rng),
    )
    return dict(zip(BASELINE_NAMES, scores, strict=True))


def evaluate_baselines(data: PreparedData, seed: int = 0) -> list[BaselineResult]:
    """Test AUC and per-user GAUC of every baseline, flattened exactly as the models' test metrics are."""
    labels = data.test.labels().ravel()
    users = np.broadcast_to(data.test.user[:, None], data.test.label.shape).ravel()  # one entry per candidate
    return [
        BaselineResult(name, auc(labels, s.ravel()), user_gauc(users, labels, s.ravel()))
        for name, s in baseline_scores(data, seed).items()
    ]
