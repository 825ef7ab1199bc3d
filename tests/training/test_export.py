"""Run folders and `dare export`: the model folder matches the contract and onnxruntime matches PyTorch.

All models here are RANDOMLY INITIALISED (with weights scaled so that scores differ clearly); nothing is trained.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.contract import GRAPH_FILES, ModelFolderError, load_manifest
from tests.conftest import export_random_model, randomize_for_tests, write_test_data_folder
from training.config import ModelConfig, TrainConfig
from training.export import (
    PARITY_CANDIDATES,
    PARITY_HISTORY_LENGTHS,
    ExportError,
    UserScoreGraph,
    compare_with_torch,
    export_run,
)
from training.model import build_model
from training.run import RunFolderError, load_run, save_run

KINDS = {"dare": (4, 8), "twin": (8, 8), "twin-proj": (8, 8)}


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    kind = request.param
    att_dim, repr_dim = KINDS[kind]
    folder = export_random_model(tmp_path_factory.mktemp(kind), kind=kind, att_dim=att_dim, repr_dim=repr_dim)
    return folder, kind


def sessions(folder: Path) -> dict[str, ort.InferenceSession]:
    return {role: ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"]) for role, file in GRAPH_FILES.items()}


def search_then_score(graphs: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """What the service runs: search.onnx, then score.onnx on its output -> (prob, topk_index, topk_weight)."""
    index, weight = graphs["search"].run(None, feed)
    (prob,) = graphs["score"].run(None, {**feed, "topk_index": index, "topk_weight": weight})
    return prob, index, weight


def user(n: int, c: int, seed: int, items: int = 60, cates: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hist_item": rng.integers(1, items, n), "hist_cate": rng.integers(1, cates, n),
        "cand_item": rng.integers(1, items, c), "cand_cate": rng.integers(1, cates, c),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_records_enforced_parity_and_provenance(exported: tuple[Path, str]) -> None:
    folder, kind = exported
    manifest = load_manifest(folder)
    assert manifest.model_kind == kind and (manifest.att_dim, manifest.repr_dim) == KINDS[kind]
    assert manifest.top_k == 5 and manifest.max_position == 50 and manifest.opset == 17
    assert manifest.vocab.item_rows == 60 and manifest.vocab.cate_rows == 12
    assert manifest.data_fingerprint == "random-init-test-fixture"
    assert manifest.code_version.startswith("0.1.0") and manifest.created_at
    assert manifest.metrics == {"note_random_init": 1} and manifest.config["model"]["kind"] == kind  # type: ignore[index]
    cases = {(p.graph, p.n, p.c) for p in manifest.parity}
    assert cases == {(g, n, c) for g in GRAPH_FILES for n in PARITY_HISTORY_LENGTHS for c in PARITY_CANDIDATES}
    assert all(0 <= p.max_abs_diff <= manifest.parity_tolerance == 1e-5 for p in manifest.parity)
    with np.load(folder / "vocab.npz", allow_pickle=False) as vocab:
        assert int(vocab["item_raw"][0]) == 1000 and int(vocab["item_index"][0]) == 2


def test_load_manifest_rejects_a_tampered_graph(exported: tuple[Path, str], tmp_path: Path) -> None:
    copy = shutil.copytree(exported[0], tmp_path / "copy")
    with (copy / "search.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelFolderError, match="search.onnx does not match the sha256"):
        load_manifest(copy)
    (copy / "score.onnx").unlink()
    with pytest.raises(ModelFolderError, match="score.onnx, which is missing"):
        load_manifest(copy, verify_hashes=False)


def test_manifest_with_failed_parity_is_rejected(exported: tuple[Path, str], tmp_path: Path) -> None:
    copy = shutil.copytree(exported[0], tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    raw["parity"][0]["max_abs_diff"] = 1e-3
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match="parity check failed"):
        load_manifest(copy)


# ------------------------------------------------------------------------------------------------ parity


def test_onnxruntime_matches_torch_on_fresh_inputs(exported: tuple[Path, str]) -> None:
    folder, _ = exported
    model = load_run(folder.parent / "run").model
    graphs = sessions(folder)
    for seed, (n, c) in enumerate([(1, 3), (4, 1), (7, 50), (333, 2), (1234, 64)], start=100):
        for role, diff in compare_with_torch(model, graphs, n, c, seed).items():
            assert diff <= 1e-5, f"{role} graph at N={n}, C={c} differs by {diff}"


def test_empty_history_and_fewer_than_k(exported: tuple[Path, str]) -> None:
    folder, _ = exported
    model = load_run(folder.parent / "run").model
    graphs = sessions(folder)
    feed = user(0, 4, seed=1)
    prob, index, weight = search_then_score(graphs, feed)
    assert prob.shape == (4,) and prob.dtype == np.float32
    assert index.shape == weight.shape == (4, 5) and index.dtype == np.int64 and weight.dtype == np.float32
    assert (index == -1).all() and (weight == 0).all()
    empty = torch.zeros(1, 0, dtype=torch.int64)
    with torch.no_grad():
        cold = torch.sigmoid(model(empty, empty, torch.from_numpy(feed["cand_item"])[None], torch.from_numpy(feed["cand_cate"])[None]))[0]
    np.testing.assert_allclose(prob, cold.numpy(), atol=1e-6)

    feed = user(3, 6, seed=2)
    prob, index, weight = search_then_score(graphs, feed)
    for row_index, row_weight in zip(index, weight, strict=True):
        assert sorted(row_index[:3].tolist()) == [0, 1, 2] and (row_index[3:] == -1).all()
        assert row_weight[:3].sum() == pytest.approx(1.0, abs=1e-6) and (row_weight[3:] == 0).all()


def test_a_folder_exported_before_the_fidelity_fix_is_refused_by_name(exported: tuple[Path, str], tmp_path: Path) -> None:
    copy = shutil.copytree(exported[0], tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    raw["schema_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match="schema_version 1 is a model exported before 2026-12.*retrain"):
        load_manifest(copy)


def test_recency_ablation_is_not_exported(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="search='recency' is an evaluation ablation"):
        export_random_model(tmp_path, search="recency")


def test_one_candidate_and_the_largest_user(exported_model_dir: Path) -> None:
    """N = 100,000 behaviours and C = 1,000 candidates in one call; candidates are independent in eval mode,
    so a slice of them is checked against PyTorch."""
    folder = exported_model_dir
    model = load_run(folder.parent / "run").model
    graphs = sessions(folder)
    (prob, _, _) = search_then_score(graphs, user(10, 1, seed=4))
    assert prob.shape == (1,)
    feed = user(100_000, 1_000, seed=5)
    prob, index, weight = search_then_score(graphs, feed)
    assert prob.shape == (1_000,) and index.shape == weight.shape == (1_000, 5)
    assert ((index >= 0) & (index < 100_000)).all() and np.isfinite(prob).all()
    sub = {k: torch.from_numpy(v)[None] for k, v in feed.items()}
    with torch.no_grad():
        index_t, weight_t = model.search(sub["hist_item"], sub["hist_cate"], sub["cand_item"][:, :16], sub["cand_cate"][:, :16])
        expected = torch.sigmoid(model.score(sub["hist_item"], sub["hist_cate"], sub["cand_item"][:, :16], sub["cand_cate"][:, :16],
                                             torch.from_numpy(index[None, :16]), weight_t))[0]  # fmt: skip
    np.testing.assert_allclose(weight[:16], weight_t[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(prob[:16], expected.numpy(), atol=1e-5)


def test_export_fails_loudly_when_parity_breaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_forward = UserScoreGraph.forward

    def off_by_a_bit(self, *args):  # type: ignore[no-untyped-def]
        return real_forward(self, *args) + 1e-3

    monkeypatch.setattr(UserScoreGraph, "forward", off_by_a_bit)
    with pytest.raises(ExportError, match="onnxruntime does not match PyTorch: .* differs by 0.001"):
        export_random_model(tmp_path)
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging folder cleaned up


# ----------------------------------------------------------------------------------------- export command


def test_reexport_replaces_the_folder_and_refuses_foreign_ones(tmp_path: Path) -> None:
    first = load_manifest(export_random_model(tmp_path, seed=1))
    second = load_manifest(export_random_model(tmp_path, seed=2))
    assert first.version != second.version  # content-addressed version
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a model folder"):
        export_run(tmp_path / "run", foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="--opset 9"):
        export_run(tmp_path / "run", tmp_path / "m2", opset=9, progress=False)


def test_cli_export_and_its_errors(tmp_path: Path) -> None:
    export_random_model(tmp_path)
    cmd = [sys.executable, "-m", "dare.cli", "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "cli"), "--name", "cli-test"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert "cli-test" in ok.stdout and load_manifest(tmp_path / "cli").name == "cli-test"
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "missing"), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "missing: not a directory" in bad.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------- run folder


def make_run(tmp_path: Path, **model: object) -> tuple[Path, torch.nn.Module]:
    cfg = TrainConfig(model=ModelConfig(**{"kind": "dare", "item_rows": 60, "cate_rows": 12, "att_dim": 4, "top_k": 5, **model}))  # type: ignore[arg-type]
    net = build_model(cfg.model)
    randomize_for_tests(net)
    save_run(tmp_path / "run", net, cfg, {"test_auc": 0.7, "curve": [0.1, 0.2]}, write_test_data_folder(tmp_path / "data"))
    return tmp_path / "run", net


def test_run_round_trip(tmp_path: Path) -> None:
    run_dir, net = make_run(tmp_path, aux_loss=True, mlp_hidden=(32, 16))
    run = load_run(run_dir)
    assert not run.model.training and run.train_cfg.model.mlp_hidden == (32, 16) and run.train_cfg.model.aux_loss
    assert run.metrics["test_auc"] == 0.7 and run.data_fingerprint == "random-init-test-fixture"
    data = user(30, 4, seed=6)
    batch = [torch.from_numpy(data[k])[None] for k in ("hist_item", "hist_cate", "cand_item", "cand_cate")]
    with torch.no_grad():
        torch.testing.assert_close(run.model(*batch), net.eval()(*batch))


def test_run_folder_errors_name_the_problem(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path)
    with pytest.raises(RunFolderError, match="not a directory"):
        load_run(tmp_path / "nope")

    broken = shutil.copytree(run_dir, tmp_path / "corrupt")
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFolderError, match="model.pt: cannot be read"):
        load_run(broken)

    mismatched = shutil.copytree(run_dir, tmp_path / "mismatch")
    config = json.loads((mismatched / "config.json").read_text())
    config["model"]["att_dim"] = 16
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunFolderError, match="does not match the model in config.json"):
        load_run(mismatched)

    config["model"]["colour"] = "blue"
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunFolderError, match=r"unknown config fields \['model.colour'\]"):
        load_run(mismatched)

    (mismatched / "config.json").write_text("{")
    with pytest.raises(RunFolderError, match="config.json: not valid JSON"):
        load_run(mismatched)

    small_vocab = shutil.copytree(run_dir, tmp_path / "vocab")
    np.savez(small_vocab / "vocab.npz", item_raw=np.arange(3), item_index=np.array([2, 3, 99]), cate_raw=np.arange(1), cate_index=np.array([2]))
    with pytest.raises(RunFolderError, match="item_index reaches row 99 but the model has 60"):
        load_run(small_vocab)

    (run_dir / "data.json").unlink()
    with pytest.raises(RunFolderError, match="no data.json"):
        load_run(run_dir)


def test_manifest_metrics_are_numbers_only() -> None:
    from training.export import _numeric_metrics

    raw = {"test_auc": 0.7, "steps": 78, "val": {"auc": 0.6, "best": True, "split": "val"}, "curve": [0.1, 0.2],
           "broken": float("nan"), "config": {"epochs": 2}, "options": {"lr": 0.01}}  # fmt: skip
    assert _numeric_metrics(raw) == {"test_auc": 0.7, "steps": 78, "val.auc": 0.6, "broken": None}
