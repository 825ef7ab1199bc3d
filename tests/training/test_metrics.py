"""Metrics against hand-computed values: GAUC weighting and skipping, NDCG on a known ranking, MI ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, roc_auc_score

from dare_common import DareError
from training.metrics import (
    MutualInformationTruth,
    _mutual_information,
    category_gauc,
    click_metrics,
    grouped_auc,
    position_bucket,
    retrieval_ndcg,
    search_scores,
    user_gauc,
)


def test_user_gauc_weights_by_impressions_and_skips_one_class_users() -> None:
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    labels = np.array([1, 0, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.95, 0.2, 0.1, 0.7, 0.3])
    # user 1: the positive beats 1 of 2 negatives -> 0.5 over 3 impressions; user 2: 1.0 over 2; user 3: one class.
    assert user_gauc(users, labels, scores) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    gauc, used = grouped_auc(users, labels, scores)
    assert used == 2 and gauc != pytest.approx(0.75)  # not the unweighted mean


def test_grouped_auc_matches_sklearn_per_group_with_ties() -> None:
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, 2000)
    labels = (rng.random(2000) < 0.3).astype(int)
    scores = np.round(rng.random(2000) + 0.3 * labels, 1)  # coarse scores: many ties
    expected_total, expected_weight, expected_used = 0.0, 0, 0
    for g in np.unique(groups):
        y, p = labels[groups == g], scores[groups == g]
        if y.min() != y.max():
            expected_total += len(y) * roc_auc_score(y, p)
            expected_weight += len(y)
            expected_used += 1
    value, used = grouped_auc(groups, labels, scores)
    assert used == expected_used
    assert value == pytest.approx(expected_total / expected_weight, abs=1e-12)


def test_gauc_with_no_usable_group_is_nan() -> None:
    assert math.isnan(user_gauc(np.array([1, 2]), np.array([1, 0]), np.array([0.3, 0.4])))


def test_category_gauc_groups_by_target_category() -> None:
    cates = np.array([7, 7, 8, 8])
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.8])  # category 7 ranked right, 8 wrong
    assert category_gauc(cates, labels, scores) == pytest.approx(0.5)


def test_click_metrics_broadcasts_users_over_candidates() -> None:
    users = np.array([0, 1])
    cates = np.array([[3, 4, 5], [3, 4, 5]])
    labels = np.array([[1, 0, 0], [1, 0, 0]], dtype=np.float32)
    logits = np.array([[2.0, -1.0, -2.0], [-3.0, 1.0, 0.0]])
    m = click_metrics(users, cates, labels, logits)
    assert m.gauc == pytest.approx(0.5)  # user 0 perfect, user 1 worst, equal weights
    assert m.gauc_users == 2 and m.impressions == 6
    assert 0.0 <= m.auc <= 1.0
    expected_logloss = -np.mean(
        [math.log(1 / (1 + math.exp(-2))), math.log(1 - 1 / (1 + math.exp(1))), math.log(1 - 1 / (1 + math.exp(2))),
         math.log(1 / (1 + math.exp(3))), math.log(1 - 1 / (1 + math.exp(-1))), math.log(0.5)]
    )  # fmt: skip
    assert m.logloss == pytest.approx(expected_logloss)


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(DareError, match="one class"):
        click_metrics(np.array([0]), np.array([[1, 1]]), np.array([[0, 0]]), np.array([[0.1, 0.2]]))
    with pytest.raises(DareError, match="same shape"):
        click_metrics(np.array([0]), np.array([[1, 1]]), np.array([[1, 0]]), np.array([[0.1, 0.2, 0.3]]))


def test_ndcg_on_a_known_ranking() -> None:
    truth = np.array([[3.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    scores = np.array([[0.9, 0.1, 0.0, 0.5], [1.0, 2.0, 3.0, 4.0]])
    # Row 0 ranks positions 0, 3 first: DCG@2 = 3 + 1/log2(3); ideal = 3 + 2/log2(3). Row 1 has no relevance: skipped.
    value, rows = retrieval_ndcg(truth, scores, k=2)
    assert rows == 1
    assert value == pytest.approx((3 + 1 / math.log2(3)) / (3 + 2 / math.log2(3)))


def test_search_scores_rank_retrieved_positions_by_weight() -> None:
    index = np.array([[2, 0, -1]])
    weight = np.array([[0.7, 0.3, 0.0]])
    scores = search_scores(index, weight, length=4)
    assert scores.shape == (1, 4)
    assert list(np.argsort(-scores[0])[:2]) == [2, 0]
    assert scores[0, 1] == 0 and scores[0, 3] == 0
    with pytest.raises(DareError, match="history length"):
        search_scores(np.array([[5]]), np.array([[1.0]]), length=4)


def test_position_buckets_are_log2() -> None:
    assert list(position_bucket(np.array([1, 2, 3, 4, 7, 8, 200]))) == [0, 1, 1, 2, 2, 3, 7]


def test_mutual_information_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, 500)
    y = (x ^ (rng.random(500) < 0.2)).astype(int)
    expected = mutual_info_score(x, y) / math.log(2)  # nats -> bits
    got = _mutual_information(
        np.array((x & y).sum()), np.array((x & (1 - y)).sum()), np.array(y.sum()), np.array((1 - y).sum())
    )
    assert float(got) == pytest.approx(expected)


def test_mutual_information_truth_finds_the_planted_category_and_position() -> None:
    """Target category 5 is clicked exactly when category 7 is the most recent behaviour; nothing else matters."""
    rng = np.random.default_rng(1)
    rows, length = 400, 8
    hist = rng.integers(2, 5, size=(rows, length))  # categories 2..4 everywhere
    label = (rng.random(rows) < 0.5).astype(np.float32)
    hist[label == 1, -1] = 7  # most recent position (column L-1)
    cand = np.full((rows, 1), 5)
    truth = MutualInformationTruth.fit(hist, cand, label[:, None], cate_rows=10, min_target_impressions=10)
    # X = Y exactly, so I(X; Y) = H(Y), about 1 bit for a balanced label.
    p = label.mean()
    h_y = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    probe = np.array([[3, 7, 2, 7], [2, 3, 4, 3]])
    rel = truth.relevance(probe, np.array([5, 5]))
    assert rel.shape == (2, 4)
    assert rel[0, 3] == pytest.approx(h_y)  # category 7 at position 1
    assert rel[0, 1] < 0.05  # category 7 further back never occurred: unseen -> 0
    assert rel[0, 3] == rel.max()
    assert (rel[1, :3] < 0.05).all()  # older positions carry no information
    # Any other category at position 1 is evidence too (of a non-click), but weaker than the planted one.
    assert 0.05 < rel[1, 3] < rel[0, 3]
    # A target category with too little support gets no truth.
    assert truth.relevance(probe, np.array([6, 6])).max() == 0
    # NDCG of a search that retrieves position 1 first is perfect.
    value, used = retrieval_ndcg(rel[:1], np.array([[0.0, 0.1, 0.2, 0.9]]), k=2)
    assert used == 1 and value == pytest.approx(1.0)


def test_mutual_information_truth_counts_presence_once_per_row() -> None:
    # Two behaviours of category 3 in the same bucket of one history count once.
    hist = np.array([[3, 3, 3, 3], [2, 2, 2, 2]])  # L=4: columns are positions 4, 3, 2, 1 -> buckets 2, 1, 1, 0
    cand = np.array([[5], [5]])
    label = np.array([[1.0], [0.0]])
    truth = MutualInformationTruth.fit(hist, cand, label, cate_rows=6, min_target_impressions=1)
    rel = truth.relevance(np.array([[0, 3, 3, 3]]), np.array([5]))
    # X_{3,b} = Y for every bucket: 1 bit each; a pad column (0) gets nothing.
    assert list(rel[0]) == pytest.approx([0.0, 1.0, 1.0, 1.0])


def test_mutual_information_truth_rejects_bad_shapes() -> None:
    with pytest.raises(DareError, match="expected"):
        MutualInformationTruth.fit(np.zeros((2, 3)), np.zeros((2, 1)), np.zeros((2, 2)), cate_rows=4)
    with pytest.raises(DareError, match="cate_rows"):
        MutualInformationTruth.fit(np.full((2, 3), 9), np.zeros((2, 1)), np.zeros((2, 1)), cate_rows=4)
