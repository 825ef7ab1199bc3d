"""`dare train`: metrics.json contents, best-checkpoint selection, learning on planted data, reproducibility, errors.

The tests build tiny prepared-data folders in the documented format (training/config.py) with a planted rule:
a user's positive target shares its category with one of the user's most recent behaviours, negatives are random.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dare_common import DareError
from training.layout import write_array
from training.run import load_run
from training.train import (
    DATA_FORMAT_VERSION,
    BestCheckpoint,
    TrainOptions,
    eval_steps,
    evaluate_clicks,
    load_prepared,
    retrieval_baselines,
    train,
)


def make_prepared(
    folder: Path,
    *,
    users: int = 160,
    train_per_user: int = 6,
    history_len: int = 30,
    categories: int = 12,
    items_per_category: int = 8,
    negatives: int = 2,
    planted_truth: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny prepared-data folder (training/layout.py) with planted structure: most events repeat the category
    of one of the user's 3 previous events, negatives have random categories (category rows 2.., item rows 2..)."""
    rng = np.random.default_rng(seed)
    cate_rows = categories + 2
    item_rows = categories * items_per_category + 2
    item_cate = np.zeros(item_rows, np.int64)
    item_cate[1] = 1
    item_cate[2:] = 2 + np.repeat(np.arange(categories), items_per_category)

    def items_of(cate: np.ndarray) -> np.ndarray:
        return 2 + (cate - 2) * items_per_category + rng.integers(0, items_per_category, size=cate.shape)

    seq_cate: list[int] = []
    offsets = [0]
    samples: dict[str, list[tuple[int, int, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for user in range(users):
        interests = rng.choice(np.arange(2, cate_rows), 2, replace=False)
        n = int(rng.integers(history_len // 3, 2 * history_len)) + train_per_user + 2  # some histories are short
        cates: list[int] = []
        for j in range(n):
            if j and rng.random() < 0.7:
                cates.append(cates[-1 - int(rng.integers(0, min(3, j)))])  # one of the 3 most recent categories
            else:
                cates.append(int(rng.choice(interests)) if rng.random() < 0.7 else int(rng.integers(2, cate_rows)))
        train_positions = np.sort(rng.choice(np.arange(1, n - 2), train_per_user, replace=False))
        for split, positions in (("train", train_positions), ("val", [n - 2]), ("test", [n - 1])):
            for position in positions:
                samples[split].append((user, int(position), rng.integers(2, cate_rows, negatives)))
        seq_cate += cates
        offsets.append(len(seq_cate))
    cate_seq = np.array(seq_cate, np.int64)
    item_seq = items_of(cate_seq)
    folder.mkdir(parents=True, exist_ok=True)
    write_array(folder / "sequences" / "item.npy", item_seq, np.int32)
    write_array(folder / "sequences" / "cate.npy", cate_seq, np.int32)
    write_array(folder / "sequences" / "time.npy", 1511539200 + np.arange(len(cate_seq)), np.uint32)
    write_array(folder / "sequences" / "offsets.npy", np.array(offsets), np.int64)
    for split, rows in samples.items():
        user = np.array([r[0] for r in rows], np.int64)
        position = np.array([r[1] for r in rows], np.int64)
        neg_cate = np.stack([r[2] for r in rows])  # [S, M]
        cand_item = np.concatenate([item_seq[np.array(offsets)[user] + position, None], items_of(neg_cate)], axis=1)
        label = np.zeros(cand_item.shape, np.uint8)
        label[:, 0] = 1
        for name, values, dtype in (("user", user, np.int32), ("position", position, np.int32),
                                    ("cand_item", cand_item, np.int32), ("cand_cate", item_cate[cand_item], np.int32),
                                    ("label", label, np.uint8)):  # fmt: skip
            write_array(folder / split / f"{name}.npy", values, dtype)
    np.savez(
        folder / "vocab.npz",
        item_raw=np.arange(1000, 1000 + item_rows - 2, dtype=np.int64),
        item_index=np.arange(2, item_rows, dtype=np.int64),
        cate_raw=np.arange(50, 50 + categories, dtype=np.int64),
        cate_index=np.arange(2, cate_rows, dtype=np.int64),
    )
    np.save(folder / "item_cate.npy", item_cate)
    if planted_truth:
        relation = np.eye(cate_rows)
        relation[:2] = 0
        decay = np.r_[0.0, 0.8 ** np.arange(history_len)]  # decay[p] for position p = 1..L
        np.savez(folder / "truth.npz", relation=relation, decay=decay)
    meta = {"data_fingerprint": f"test-{seed}-{users}", "synthetic": planted_truth, "format_version": DATA_FORMAT_VERSION,
            "history_len": history_len}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("planted") / "data")


@pytest.fixture(scope="module")
def dare_run(planted: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "dare"
    options = TrainOptions(model="dare", att_dim=8, repr_dim=16, top_k=5, epochs=2, batch_size=64, evals_per_epoch=3,
                           patience=100)  # fmt: skip
    result = train(planted, options, out, progress=False)
    return out, result.metrics


def test_train_writes_every_metric_with_sane_values(dare_run: tuple[Path, dict]) -> None:
    out, metrics = dare_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test_auc"] == pytest.approx(metrics["test_auc"])
    for key in ("test_auc", "test_gauc", "test_category_gauc", "val_auc", "val_gauc", "test_ndcg_at_k"):
        assert 0.0 <= on_disk[key] <= 1.0, key
    assert on_disk["test_logloss"] > 0 and math.isfinite(on_disk["test_logloss"])
    assert on_disk["train_seconds"] > 0
    assert on_disk["steps"] == 2 * math.ceil(160 * 6 / 64)
    assert 1 <= on_disk["best_step"] <= on_disk["steps"]
    assert on_disk["data_fingerprint"] == "test-0-160"
    assert on_disk["config"]["model"]["kind"] == "dare"
    assert on_disk["config"]["model"]["att_dim"] == 8 and on_disk["config"]["model"]["repr_dim"] == 16
    assert on_disk["config"]["lr"] == 0.01 and on_disk["config"]["l2"] == 1e-6
    assert on_disk["ndcg_truth"] == "planted" and on_disk["ndcg_k"] == 5 and on_disk["ndcg_impressions"] > 0
    assert on_disk["test_gauc_users"] > 0
    assert len(on_disk["evals"]) == 6  # 3 per epoch
    for name in ("config.json", "model.pt", "vocab.npz", "data.json"):
        assert (out / name).is_file(), name


def test_train_beats_chance_on_planted_data(dare_run: tuple[Path, dict], planted: Path) -> None:
    _, metrics = dare_run
    assert metrics["test_auc"] > 0.6
    # The search should prefer recent same-category behaviours: clearly above a random top-5.
    data = load_prepared(planted)
    baselines = retrieval_baselines(data, data.test, k=5)
    assert 0 < baselines["random"] < baselines["recency"] < 1
    assert metrics["test_ndcg_at_k"] > baselines["random"] + 0.1


def test_saved_checkpoint_is_the_best_validation_step(dare_run: tuple[Path, dict], planted: Path) -> None:
    out, metrics = dare_run
    evals = metrics["evals"]
    best = max(evals, key=lambda e: e["val_auc"])
    assert metrics["best_step"] == best["step"]
    assert metrics["stop_reason"] == "max_epochs" and metrics["max_epochs"] == 2  # patience 100 never triggers
    # The weights on disk reproduce the best validation AUC.
    loaded = load_run(out)
    val = evaluate_clicks(loaded.model, load_prepared(planted).val, 1024, torch.device("cpu"))
    assert val.auc == pytest.approx(best["val_auc"], abs=1e-6)
    assert metrics["val_auc"] == pytest.approx(best["val_auc"], abs=1e-6)


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights(
    planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation AUCs are scripted (0.60, 0.70, 0.65, 0.69, 0.68, ...): with patience 3 training stops at the
    5th evaluation, the 2nd is the best, and the saved weights are the ones the 2nd evaluation saw."""
    import dataclasses

    import training.train as train_module

    real = train_module.evaluate_clicks
    script = [0.60, 0.70, 0.65, 0.69, 0.68, 0.99, 0.99]
    seen: list[dict[str, torch.Tensor]] = []

    def scripted(model, split, batch_size, device, precision="fp32"):  # type: ignore[no-untyped-def]
        metrics = real(model, split, batch_size, device, precision)
        if split.name != "val" or len(seen) >= len(script):
            return metrics
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return dataclasses.replace(metrics, auc=script[len(seen) - 1])

    monkeypatch.setattr(train_module, "evaluate_clicks", scripted)
    options = TrainOptions(model="dare", att_dim=8, repr_dim=16, top_k=5, epochs=20, batch_size=64, evals_per_epoch=3, patience=3)
    metrics = train(planted, options, tmp_path / "run", progress=False).metrics
    assert [e["val_auc"] for e in metrics["evals"]] == script[:5]
    assert metrics["stop_reason"] == "patience" and metrics["patience"] == 3
    assert metrics["best_step"] == metrics["evals"][1]["step"] and metrics["steps"] == metrics["evals"][4]["step"]
    assert metrics["best_epoch"] == pytest.approx(metrics["evals"][1]["epoch"], abs=1e-3)
    assert metrics["evals"][1]["samples_seen"] == metrics["evals"][1]["step"] * 64
    saved = load_run(tmp_path / "run").model.state_dict()
    for name, value in seen[1].items():
        torch.testing.assert_close(saved[name], value, msg=name)


def test_best_checkpoint_keeps_the_highest_auc_state() -> None:
    model = torch.nn.Linear(2, 1)
    tracker = BestCheckpoint()
    for step, auc in ((1, 0.6), (2, 0.8), (3, 0.7), (4, float("nan"))):
        with torch.no_grad():
            model.weight.fill_(step)
        tracker.offer(model, auc, step)
    assert tracker.step == 2 and tracker.auc == 0.8
    tracker.restore(model)
    assert torch.all(model.weight == 2)


def test_a_spilled_best_checkpoint_restores_from_its_file_and_is_removed(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    tracker = BestCheckpoint(spill=tmp_path / "run" / ".best.pt")
    for step, auc in ((1, 0.6), (2, 0.8), (3, 0.7)):
        with torch.no_grad():
            model.weight.fill_(step)
        tracker.offer(model, auc, step)
    assert tracker.state is None and (tmp_path / "run" / ".best.pt").is_file()
    tracker.restore(model)
    assert torch.all(model.weight == 2) and tracker.step == 2
    tracker.discard()
    assert not (tmp_path / "run" / ".best.pt").exists()
    with pytest.raises(DareError, match="no checkpoint was evaluated"):
        BestCheckpoint(spill=tmp_path / "x.pt").restore(model)


def test_eval_steps_spread_over_each_epoch() -> None:
    assert eval_steps(10, 2, 4) == {2, 5, 8, 10, 12, 15, 18, 20}
    assert eval_steps(2, 1, 5) == {1, 2}  # never more evaluations than steps


def test_twin_runs_with_aux_loss_and_seeds_reproduce(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "data", users=60, train_per_user=3)
    options = TrainOptions(model="twin", att_dim=8, top_k=5, epochs=1, batch_size=64, evals_per_epoch=1, aux_loss=True)
    first = train(data, options, tmp_path / "a", progress=False).metrics
    second = train(data, options, tmp_path / "b", progress=False).metrics
    assert first["test_auc"] == second["test_auc"] and first["test_logloss"] == second["test_logloss"]
    other = train(data, TrainOptions(**{**options.__dict__, "seed": 1}), tmp_path / "c", progress=False).metrics
    assert other["test_logloss"] != first["test_logloss"]


def test_real_data_uses_mutual_information_truth(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "real", users=60, train_per_user=4, planted_truth=False)
    options = TrainOptions(model="twin-proj", att_dim=4, top_k=5, epochs=1, batch_size=128, evals_per_epoch=1)
    metrics = train(data, options, tmp_path / "run", progress=False).metrics
    assert metrics["ndcg_truth"] == "mutual_information"
    assert metrics["synthetic_data"] is False


def test_planted_truth_from_dare_synth_is_read_as_relation_times_decay(tmp_path: Path) -> None:
    """The truth written by `dare synth` and remapped by `dare prepare` is what the NDCG is scored against."""
    from training.config import PrepareConfig
    from training.prepare import prepare
    from training.synth import SynthConfig, write_log

    write_log(SynthConfig(users=30, events_per_user=40, categories=6, items=60, seed=0), tmp_path / "log.csv", progress=False)
    prepare(PrepareConfig(history_len=16, min_events=10), tmp_path / "log.csv", tmp_path / "data", progress=False)
    data = load_prepared(tmp_path / "data")
    assert data.synthetic and data.planted is not None
    with np.load(tmp_path / "data" / "truth.npz") as raw:
        relation, decay = raw["relation"], raw["decay"]
    hist, target = data.test.hist_cate[:5], data.test.cand_cate[:5, 0]
    rel = data.planted.relevance(hist, target)  # [5, 16]
    row, col = np.argwhere(hist != 0)[0]
    assert rel[row, col] == pytest.approx(relation[target[row], hist[row, col]] * decay[16 - col])
    assert (rel[hist == 0] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "din"}, "unknown model 'din'"),
        ({"model": "twin", "att_dim": 16, "repr_dim": 64}, "must be equal"),
        ({"model": "twin-proj", "att_dim": 8, "repr_dim": 4}, "must be equal"),
        ({"att_dim": 0}, "--att-dim must be >= 1"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"lr": -1.0}, "--lr must be a positive number"),
    ],
)
def test_bad_options_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DareError, match=message):
        TrainOptions(**kwargs)


def test_bad_data_folders_are_clear_errors(tmp_path: Path, planted: Path) -> None:
    with pytest.raises(DareError, match="does not exist"):
        load_prepared(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DareError, match="no meta.json"):
        load_prepared(empty)
    (empty / "meta.json").write_text('{"data_fingerprint": "x", "format_version": 1}')
    with pytest.raises(DareError, match="prepared-data format 1, this code reads format 2.*run `dare prepare` again"):
        load_prepared(empty)
    (empty / "meta.json").write_text(json.dumps({"data_fingerprint": "x", "format_version": 2, "history_len": 5}))
    np.savez(empty / "vocab.npz", item_raw=np.arange(3), item_index=np.arange(2, 5), cate_raw=np.arange(2), cate_index=np.arange(2, 4))
    with pytest.raises(DareError, match="missing sequences/item.npy"):
        load_prepared(empty)
    broken = make_prepared(tmp_path / "broken", users=10, train_per_user=1)
    (broken / "val" / "label.npy").unlink()
    with pytest.raises(DareError, match="missing val/label.npy"):
        load_prepared(broken)
    broken = make_prepared(tmp_path / "broken2", users=10, train_per_user=1)
    position = np.load(broken / "test" / "position.npy")
    np.save(broken / "test" / "position.npy", position + 1)  # the last event of each user is the test target
    with pytest.raises(DareError, match="test/position.npy points past a user's sequence"):
        load_prepared(broken)
    (broken / "sequences" / "offsets.npy").write_bytes(b"not an npy")
    with pytest.raises(DareError, match="offsets.npy: not a readable .npy file"):
        load_prepared(broken)
    with pytest.raises(DareError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        train(planted, TrainOptions(device="cuda", epochs=1), tmp_path / "run", progress=False)


def test_bf16_autocast_runs_the_forward_in_bfloat16_on_cpu(planted: Path, tmp_path: Path) -> None:
    from training.train import autocast

    data = load_prepared(planted)
    options = TrainOptions(model="dare", att_dim=8, repr_dim=16, top_k=5, epochs=2, batch_size=64, evals_per_epoch=1,
                           patience=100, precision="bf16")  # fmt: skip
    result = train(data, options, tmp_path / "run", progress=False)
    batch = data.test.batch(np.arange(8), torch.device("cpu"))
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        assert result.model(*batch).dtype == torch.bfloat16  # the matmuls ran in bf16
    with torch.no_grad(), autocast(torch.device("cpu"), "fp32"):
        assert result.model(*batch).dtype == torch.float32
    assert result.metrics["precision"] == "bf16" and result.metrics["test_auc"] > 0.6


def test_sparse_embeddings_use_sparse_adam_and_learn(planted: Path, tmp_path: Path) -> None:
    from training.model import build_model
    from training.train import build_configs, build_optimizers

    options = TrainOptions(model="dare", att_dim=8, repr_dim=16, top_k=5, epochs=2, batch_size=64, evals_per_epoch=1,
                           patience=100, sparse_embeddings=True)  # fmt: skip
    model = build_model(build_configs(options, load_prepared(planted)).model)
    sparse_adam, adam = build_optimizers(model, options)
    assert isinstance(sparse_adam, torch.optim.SparseAdam) and isinstance(adam, torch.optim.Adam)
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert all(t.sparse for t in tables) and len(sparse_adam.param_groups[0]["params"]) == len(tables)
    metrics = train(planted, options, tmp_path / "run", progress=False).metrics
    assert metrics["sparse_embeddings"] is True and metrics["test_auc"] > 0.6


def test_a_sample_budget_stops_training_and_validates_once_at_the_end(planted: Path, tmp_path: Path) -> None:
    options = TrainOptions(model="twin", att_dim=8, top_k=5, batch_size=64, evals_per_epoch=1, max_samples=200)
    metrics = train(planted, options, tmp_path / "run", progress=False).metrics
    assert metrics["stop_reason"] == "max_samples" and metrics["steps"] == 4 and metrics["train_samples_seen"] == 256
    assert [e["step"] for e in metrics["evals"]] == [4] and metrics["best_step"] == 4
    assert metrics["train_samples_per_second"] > 0 and metrics["processes"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--precision", "fp8"], "unknown --precision 'fp8'"), (["--max-samples", "0"], "--max-samples must be >= 1"),
     (["--nproc", "0"], "--nproc must be >= 1")],
)  # fmt: skip
def test_cli_bad_training_options_exit_2_with_one_line(planted: Path, tmp_path: Path, args: list, message: str) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "dare.cli", "train", "--data", str(planted), "--out", str(tmp_path / "r"), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_recorded_options_match_with_later_options_at_their_defaults() -> None:
    """A run recorded before --precision/--max-samples/--sparse-embeddings existed is the same run as one asking for
    their defaults (so `dare compare` and `dare curve` reuse it), and not the same as one asking for other values."""
    import dataclasses

    options = TrainOptions(model="twin", att_dim=8, seed=3)
    recorded = json.loads(json.dumps(dataclasses.asdict(options)))
    assert options.same_as_recorded(recorded)
    older = {k: v for k, v in recorded.items() if k not in ("precision", "max_samples", "sparse_embeddings")}
    assert options.same_as_recorded(older)
    assert not dataclasses.replace(options, precision="bf16").same_as_recorded(older)
    assert not dataclasses.replace(options, seed=4).same_as_recorded(recorded)
    assert not options.same_as_recorded({**recorded, "unknown_option": 1}) and not options.same_as_recorded(None)
