"""Model-free baselines on tiny hand-made splits: each feature against a hand count, train-only fitting, seeding, and
the same flattening as the models' metrics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training import baselines
from training.baselines import (
    BASELINE_NAMES,
    ItemStatistics,
    baseline_scores,
    category_share,
    count_in_history,
    cooccurrence,
    cross_fitted_features,
    evaluate_baselines,
)
from training.metrics import click_metrics
from training.train import PreparedData, Split


def make_split(
    name: str,
    user: list[int],
    hist_item: list[list[int]],
    cand_item: list[list[int]],
    hist_cate: list[list[int]] | None = None,
    cand_cate: list[list[int]] | None = None,
) -> Split:
    """Categories default to item % 3 + 2 (pad stays 0); column 0 of the candidates is the positive."""
    hist, cand = np.array(hist_item, np.int64), np.array(cand_item, np.int64)
    label = np.zeros(cand.shape, np.float32)
    label[:, 0] = 1
    return Split.from_histories(
        name,
        np.array(user, np.int64),
        hist,
        np.array(hist_cate, np.int64) if hist_cate else np.where(hist != 0, hist % 3 + 2, 0),
        cand,
        np.array(cand_cate, np.int64) if cand_cate else cand % 3 + 2,
        label,
    )


def make_data(train: Split, test: Split, item_rows: int = 64) -> PreparedData:
    return PreparedData(folder=Path("unused"), train=train, val=test, test=test, item_rows=item_rows, cate_rows=8,
                        history_len=train.hist_item.shape[1], fingerprint="test", synthetic=False)  # fmt: skip


def planted(users: int, seed: int) -> tuple[Split, Split]:
    """Positives repeat a history item, negatives (items 40..63) never occur in any history: the protocol's rule."""
    rng = np.random.default_rng(seed)

    def split(name: str, per_user: int) -> Split:
        user = np.repeat(np.arange(users), per_user)
        hist = rng.integers(2, 40, size=(len(user), 6))
        hist[: len(user) // 2, :2] = 0  # some short, left-padded histories
        cand = np.c_[hist[np.arange(len(user)), rng.integers(2, 6, len(user))], rng.integers(40, 64, (len(user), 2))]
        return make_split(name, user.tolist(), hist.tolist(), cand.tolist())

    return split("train", 3), split("test", 1)


def test_candidate_in_history_counts_repeats_and_ignores_padding() -> None:
    hist = np.array([[0, 0, 5, 7, 5], [3, 4, 3, 3, 9]])
    cand = np.array([[5, 0, 7], [3, 7, 4]])  # a pad-valued candidate never matches the padding
    np.testing.assert_array_equal(count_in_history(hist, cand), [[2, 0, 1], [3, 0, 1]])


def test_category_share_is_the_fraction_of_non_padding_events() -> None:
    split = make_split("test", [0], [[0, 0, 5, 6, 7]], [[8, 9, 10]], hist_cate=[[0, 0, 3, 3, 4]],
                       cand_cate=[[3, 4, 6]])  # fmt: skip
    np.testing.assert_allclose(category_share(split), [[2 / 3, 1 / 3, 0]])


def test_popularity_counts_training_histories_and_positive_targets_only() -> None:
    train = make_split("train", [0, 1], [[0, 2, 3], [2, 2, 4]], [[5, 6], [3, 6]])
    test = make_split("test", [0], [[2, 9, 9]], [[9, 2, 3]])  # item 9 occurs only in the test split
    stats = ItemStatistics.fit(train, item_rows=12)
    # 2: three history events; 3: one event + one target; 4, 5: one each; 6 is only a training negative.
    np.testing.assert_array_equal(stats.popularity[[2, 3, 4, 5, 6, 9]], [3, 2, 1, 1, 0, 0])
    scores = baseline_scores(make_data(train, test, item_rows=12))
    np.testing.assert_array_equal(scores["popularity"], [[0, 3, 2]])
    np.testing.assert_array_equal(scores["inverse popularity"], [[0, -3, -2]])


def test_cooccurrence_is_the_share_of_followers_within_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Training sequences (history, then the positive): 2 3 4 5 and 2 6 3 (left padding never pairs).
    train = make_split("train", [0, 1], [[2, 3, 4], [0, 2, 6]], [[5, 7], [3, 7]])
    test = make_split("test", [2], [[0, 2, 3]], [[3, 4, 6]])
    stats = ItemStatistics.fit(train, item_rows=12)
    # From 2: 3 twice, 4, 5, 6 once each (5 pairs); from 3: 4 and 5; from 6: 3. Nothing follows the padding.
    np.testing.assert_allclose(stats.follow[2].toarray().ravel()[[3, 4, 5, 6]], [2 / 5, 1 / 5, 1 / 5, 1 / 5])
    np.testing.assert_allclose(stats.follow[3].toarray().ravel()[[4, 5]], [1 / 2, 1 / 2])
    assert stats.follow[0].nnz == 0
    # Candidate 3: P(2->3) + P(3->3); 4: P(2->4) + P(3->4); 6: P(2->6).
    np.testing.assert_allclose(cooccurrence(test, stats), [[2 / 5, 1 / 5 + 1 / 2, 1 / 5]])

    monkeypatch.setattr(baselines, "CO_WINDOW", 1)  # only the next event follows; only the last item scores
    stats = ItemStatistics.fit(train, item_rows=12)
    np.testing.assert_allclose(stats.follow[2].toarray().ravel()[[3, 6]], [1 / 2, 1 / 2])
    np.testing.assert_allclose(cooccurrence(test, stats), [[0, 1, 0]])


def test_item_statistics_do_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    train, _ = planted(users=20, seed=3)
    whole = ItemStatistics.fit(train, item_rows=64)
    monkeypatch.setattr(baselines, "CHUNK_ROWS", 7)
    chunked = ItemStatistics.fit(train, item_rows=64)
    assert abs(whole.follow - chunked.follow).max() < 1e-12
    np.testing.assert_array_equal(whole.popularity, chunked.popularity)


def test_training_features_are_cross_fitted_so_a_positive_never_counts_itself() -> None:
    # Every user's positive is an item nobody else ever sees: in-sample it would have popularity 1 and
    # co-occurrence 1 with its own history; from the other fold's users both are 0.
    users = 10
    train = make_split("train", list(range(users)), [[0, 2, 3]] * users,
                       [[10 + u, 4] for u in range(users)])  # fmt: skip
    feats = cross_fitted_features(train, item_rows=32, rng=np.random.default_rng(0)).reshape(users, 2, 4)
    np.testing.assert_array_equal(feats[:, 0, 0], 0)  # log1p(popularity) of the positives
    np.testing.assert_array_equal(feats[:, 0, 3], 0)  # co-occurrence of the positives
    assert (feats[:, 1, 0] == 0).all()  # item 4 is only ever a negative


def test_random_is_seeded() -> None:
    train, test = planted(users=12, seed=0)
    data = make_data(train, test)
    first, again, other = (baseline_scores(data, seed)["random"] for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_perfectly_separating_feature_scores_auc_one() -> None:
    train, test = planted(users=30, seed=1)
    results = {r.name: r for r in evaluate_baselines(make_data(train, test))}
    assert results["candidate in history"].test_auc == 1.0
    assert results["candidate in history"].test_gauc == 1.0
    assert results["logistic regression"].test_auc == 1.0  # it learns the rule from the training split
    assert 0.3 < results["random"].test_auc < 0.7


def test_logistic_regression_never_reads_the_test_labels() -> None:
    train, test = planted(users=30, seed=2)
    flipped = replace(test, label=1 - test.label)
    before = baseline_scores(make_data(train, test))["logistic regression"]
    after = baseline_scores(make_data(train, flipped))["logistic regression"]
    np.testing.assert_array_equal(before, after)
    # ...while the training labels do matter.
    shuffled = replace(train, label=np.random.default_rng(0).permuted(train.label, axis=1))
    assert not np.allclose(before, baseline_scores(make_data(shuffled, test))["logistic regression"])


def test_results_are_in_order_and_flattened_as_the_models_are() -> None:
    train, test = planted(users=30, seed=4)
    data = make_data(train, test)
    results = evaluate_baselines(data)
    assert [r.name for r in results] == list(BASELINE_NAMES)
    first = results[0]
    assert first.to_dict() == {"name": "random", "test_auc": first.test_auc, "test_gauc": first.test_gauc}
    for result, scores in zip(results, baseline_scores(data).values(), strict=True):
        expected = click_metrics(test.user, test.cand_cate, test.label, scores)  # what evaluate_clicks computes
        assert (result.test_auc, result.test_gauc) == pytest.approx((expected.auc, expected.gauc))
