"""The prepared-data layout (training/layout.py): sequences stored once, histories sliced per batch.

The layout before it wrote every sample's history as an [S, L] array, gathered from the sorted events with a sliding
window (`old_layout_histories` below is that gather, kept here only to prove that the new layout yields the same
samples): the same events, targets and negatives must come out sample by sample, so accuracy results do not move.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import PrepareConfig
from training.layout import Sequences
from training.prepare import SPLITS, NegativeSampler, build_events, default_sample_path, prepare, read_log, split_targets
from training.stages import StageProgress
from training.train import Split, load_prepared


def old_layout_histories(values: np.ndarray, target: np.ndarray, user_start: np.ndarray, length: int) -> np.ndarray:
    """The [S, L] history array the previous layout stored: the L events before each target, left-padded with 0."""
    padded = np.concatenate([np.zeros(length, dtype=np.int64), values.astype(np.int64)])  # (L + E,)
    block = np.lib.stride_tricks.sliding_window_view(padded, length)[target].copy()  # row g = values[g-L:g]
    n_pad = length - (target - user_start)
    block[np.arange(length)[None, :] < n_pad[:, None]] = 0
    return block


def old_layout(cfg: PrepareConfig) -> dict[str, dict[str, np.ndarray]]:
    """The previous layout's arrays of every split, built from the same stages the new `prepare` runs."""
    with StageProgress(False) as stages:
        ev = build_events(read_log(default_sample_path(), cfg, stages), cfg, stages)
    sampler = NegativeSampler(ev, cfg.seed)
    out = {}
    for split in SPLITS:  # the order `prepare` draws negatives in
        users, target = split_targets(ev, cfg, split)
        neg = sampler.sample(users, cfg.negatives_per_positive)
        cand_item = np.concatenate([ev.item[target, None], neg], axis=1).astype(np.int64)
        label = np.zeros(cand_item.shape, np.float32)
        label[:, 0] = 1
        out[split] = {
            "user": users,
            "hist_item": old_layout_histories(ev.item, target, ev.start[users], cfg.history_len),
            "hist_cate": old_layout_histories(ev.cate, target, ev.start[users], cfg.history_len),
            "cand_item": cand_item,
            "cand_cate": ev.item_cate[cand_item],
            "label": label,
        }
    return out


@pytest.mark.parametrize("cfg", [PrepareConfig(), PrepareConfig(history_len=50, seed=3)], ids=["default", "L50-seed3"])
def test_new_layout_gives_the_old_layouts_samples_one_by_one(cfg: PrepareConfig, tmp_path: Path) -> None:
    prepare(cfg, None, tmp_path / "data", progress=False)
    data = load_prepared(tmp_path / "data")
    old = old_layout(cfg)
    for split in SPLITS:
        new = getattr(data, split)
        assert new.rows == len(old[split]["user"]) > 0
        rows = np.arange(new.rows)
        hist_item, hist_cate = new.histories(rows)
        np.testing.assert_array_equal(new.user, old[split]["user"])
        np.testing.assert_array_equal(hist_item, old[split]["hist_item"])
        np.testing.assert_array_equal(hist_cate, old[split]["hist_cate"])
        np.testing.assert_array_equal(new.cand_item, old[split]["cand_item"])
        np.testing.assert_array_equal(new.cand_cate, old[split]["cand_cate"])
        np.testing.assert_array_equal(new.labels(), old[split]["label"])
        # Batches in shuffled order slice the same rows as the whole-split view.
        order = np.random.default_rng(0).permutation(new.rows)[:257]
        batch = new.batch(order, torch.device("cpu"))
        np.testing.assert_array_equal(batch[0].numpy(), old[split]["hist_item"][order])
        np.testing.assert_array_equal(batch[3].numpy(), old[split]["cand_cate"][order])


def test_histories_are_left_padded_and_never_reach_into_another_user() -> None:
    # User 0: items 10, 11, 12; user 1: items 20..24. History length 4.
    item = np.array([10, 11, 12, 20, 21, 22, 23, 24], np.int32)
    seq = Sequences(item, item + 100, np.zeros(8, np.uint32), np.array([0, 3, 8]), history_len=4)
    hist_item, hist_cate = seq.histories(np.array([0, 0, 1, 1, 1]), np.array([0, 2, 0, 1, 4]))
    assert hist_item.dtype == np.int64
    assert hist_item.tolist() == [
        [0, 0, 0, 0],  # the first event has no history
        [0, 0, 10, 11],
        [0, 0, 0, 0],  # user 1's first event: nothing of user 0 leaks in
        [0, 0, 0, 20],
        [20, 21, 22, 23],  # the 4 events before the target, oldest first
    ]
    assert (hist_cate[hist_item != 0] == hist_item[hist_item != 0] + 100).all()
    assert (hist_cate[hist_item == 0] == 0).all()


@pytest.mark.parametrize("length", [1, 3, 7, 40, 120])
def test_histories_match_a_sample_by_sample_slice(length: int) -> None:
    """Random users and targets, including histories cut at the first event of the whole array and sequences
    shorter in total than the history length: each row is values[max(start, target - L):target], left-padded."""
    rng = np.random.default_rng(length)
    counts = rng.integers(1, 12, 9)  # events per user
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item = rng.integers(1, 1000, offsets[-1]).astype(np.int32)
    seq = Sequences(item, item + 5000, np.zeros(len(item), np.uint32), offsets, history_len=length)
    user = rng.integers(0, len(counts), 300)
    position = rng.integers(0, counts[user])
    hist_item, hist_cate = seq.histories(user, position)
    for row, (u, p) in enumerate(zip(user, position)):
        target = offsets[u] + p
        events = item[max(offsets[u], target - length) : target]
        expected = np.concatenate([np.zeros(length - len(events), np.int64), events])
        np.testing.assert_array_equal(hist_item[row], expected)
        np.testing.assert_array_equal(hist_cate[row], np.where(expected != 0, expected + 5000, 0))


def test_a_split_built_from_histories_gives_them_back() -> None:
    rng = np.random.default_rng(0)
    hist = np.zeros((6, 5), np.int64)
    for i, n in enumerate([0, 1, 3, 5, 2, 4]):
        hist[i, 5 - n :] = rng.integers(2, 50, n)
    cand = rng.integers(2, 50, (6, 3))
    split = Split.from_histories("x", np.array([0, 0, 1, 1, 2, 2]), hist, hist + 1000 * (hist != 0), cand, cand + 7,
                                 np.tile([1.0, 0.0, 0.0], (6, 1)))  # fmt: skip
    hist_item, hist_cate = split.histories(np.arange(6))
    np.testing.assert_array_equal(hist_item, hist)
    np.testing.assert_array_equal(hist_cate, hist + 1000 * (hist != 0))
    sub = split.subset(np.array([4, 1]))
    np.testing.assert_array_equal(sub.hist_item, hist[[4, 1]])
    np.testing.assert_array_equal(sub.user, [2, 0])


def test_the_folder_stores_each_event_once(tmp_path: Path) -> None:
    """Disk use no longer grows with history length x samples: 4 bytes per event and field, ~22 bytes per sample."""
    meta = prepare(PrepareConfig(), None, tmp_path / "data", progress=False).meta
    events, samples = meta["counts"]["rows_kept"], sum(meta["counts"]["samples"].values())
    stored = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*.npy") if p.parent.name != "data")
    header = 128 * (4 + 5 * len(SPLITS))  # one .npy header per file
    assert stored == header + 12 * events + 8 * (meta["users"] + 1) + samples * (4 + 4 + 3 * (4 + 4 + 1))
