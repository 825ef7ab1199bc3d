"""Data-parallel training (training/distributed.py): torchrun with 2 CPU processes, gloo, DistributedDataParallel."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dare_common import DareError
from tests.training.test_train import make_prepared
from training.config import PrepareConfig
from training.distributed import backend_for, launch, options_from_json
from training.prepare import prepare
from training.train import Ranks, TrainOptions, train

# The same fixed budget for every run of the comparison: 2 epochs of the bundled sample, no early stopping.
BUNDLED = TrainOptions(epochs=2, patience=100, evals_per_epoch=2)
SINGLE_SEEDS = 4


def test_ranks_split_each_batch_into_contiguous_disjoint_shares() -> None:
    rows = np.arange(11) * 3
    shares = [Ranks(rank, 3).shard(rows) for rank in range(3)]
    assert np.concatenate(shares).tolist() == rows.tolist()
    assert [len(s) for s in shares] == [4, 4, 3]
    assert Ranks().shard(rows) is rows and Ranks().main and not Ranks(1, 2).main


def test_gloo_on_cpu_nccl_on_cuda() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundled") / "data"
    prepare(PrepareConfig(), None, out, progress=False)
    return out


def _check_ranks(metrics: dict, world: int) -> None:
    ranks = metrics["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world)) and metrics["processes"] == world
    # The same seed gives every rank the same initial weights, and synchronised gradients keep them identical.
    assert len({r["initial_weights_sha256"] for r in ranks}) == 1
    assert len({r["final_weights_sha256"] for r in ranks}) == 1
    assert ranks[0]["final_weights_sha256"] != ranks[0]["initial_weights_sha256"]
    # Each rank trained on its own share of every batch: together, every sample of the run once.
    assert sum(r["samples"] for r in ranks) == metrics["train_samples_seen"]
    assert max(r["samples"] for r in ranks) - min(r["samples"] for r in ranks) <= metrics["steps"]


@pytest.mark.slow
def test_two_processes_match_one_within_seed_noise_on_the_bundled_sample(bundled: Path, tmp_path: Path) -> None:
    """2 ranks (torchrun, gloo) vs 1 process, the same budget: the 2-rank test AUC must fall inside the 99%
    prediction interval of a new 1-process run, estimated from SINGLE_SEEDS seeds (t distribution)."""
    single = [
        train(bundled, dataclasses.replace(BUNDLED, seed=seed), tmp_path / f"one-{seed}", progress=False).metrics
        for seed in range(SINGLE_SEEDS)
    ]
    metrics = launch(bundled, BUNDLED, tmp_path / "two", 2, progress=False)
    _check_ranks(metrics, 2)
    # One run folder, written once by rank 0; validation and test over the whole splits.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["config.json", "data.json", "metrics.json", "model.pt", "vocab.npz"]
    assert metrics["test_impressions"] == single[0]["test_impressions"]
    assert metrics["steps"] == single[0]["steps"] and len(metrics["evals"]) == len(single[0]["evals"])
    aucs = np.array([m["test_auc"] for m in single])
    n = len(aucs)
    half_width = stats.t.ppf(0.995, n - 1) * aucs.std(ddof=1) * np.sqrt(1 + 1 / n)
    assert abs(metrics["test_auc"] - aucs.mean()) <= half_width, (metrics["test_auc"], aucs.tolist())
    assert metrics["test_auc"] > 0.7


def test_two_processes_with_sparse_gradients_and_bf16(tmp_path: Path) -> None:
    """Sparse embedding gradients all-reduce through gloo, bf16 autocast runs under DistributedDataParallel, and a
    sample budget ends the run with one final validation."""
    data = make_prepared(tmp_path / "data", users=60, train_per_user=4, history_len=20)
    options = TrainOptions(att_dim=8, top_k=5, batch_size=32, sparse_embeddings=True, precision="bf16", max_samples=100,
                           evals_per_epoch=1)  # 8 steps per epoch: the budget (4 steps) ends before the first evaluation
    metrics = launch(data, options, tmp_path / "run", 2, progress=False)
    _check_ranks(metrics, 2)
    assert metrics["stop_reason"] == "max_samples" and metrics["steps"] == 4 and metrics["train_samples_seen"] == 128
    assert metrics["sparse_embeddings"] is True and metrics["precision"] == "bf16"
    assert len(metrics["evals"]) == 1 and metrics["best_step"] == 4


def test_bad_launches_are_clear_errors(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "data", users=10, train_per_user=1)
    with pytest.raises(DareError, match="--nproc must be >= 1"):
        launch(data, TrainOptions(), tmp_path / "run", 0)
    with pytest.raises(DareError, match="does not exist"):
        launch(tmp_path / "nope", TrainOptions(), tmp_path / "run", 2)
    with pytest.raises(DareError, match="NCCL cannot all-reduce sparse gradients"):
        launch(data, TrainOptions(device="cuda", sparse_embeddings=True), tmp_path / "run", 2)
    with pytest.raises(DareError, match="unknown: \\['bogus'\\]"):
        options_from_json('{"bogus": 1}')
    # A rank started without torchrun says so and exits 2 (no traceback).
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "training.distributed", "--data", str(data), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, env=env, check=False)  # fmt: skip
    assert result.returncode == 2 and "must be started by torchrun" in result.stderr and "Traceback" not in result.stderr


def test_a_last_batch_smaller_than_the_ranks_is_skipped_and_the_schedule_stays_aligned(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "data", users=13, train_per_user=5, history_len=10)  # 65 samples: 2 x 32 + 1
    options = TrainOptions(att_dim=4, top_k=3, batch_size=32, epochs=2, evals_per_epoch=1, patience=100)
    metrics = launch(data, options, tmp_path / "run", 2, progress=False)
    _check_ranks(metrics, 2)
    assert metrics["steps_per_epoch"] == 2 and metrics["steps"] == 4 and metrics["train_samples_seen"] == 128
    assert [e["step"] for e in metrics["evals"]] == [2, 4]  # each epoch's end is still evaluated
