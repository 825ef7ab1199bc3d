"""`dare compare`: a 2-seed tiny grid writes baselines, the table, paired differences, verdicts, the JSON of every run
and the charts; the grid compares equal dims; the verdicts are computed from the runs; resume; bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dare_common import DareError
from tests.training.test_train import make_prepared
from training.compare import CompareOptions, compare, paired, summarise, verdicts


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("compare")
    data = make_prepared(root / "data", users=60, train_per_user=3, history_len=20)
    options = CompareOptions(att_dims=(4, 8), decoupled=((4, 8),), seeds=2, top_k=5, epochs=2, patience=1,
                             batch_size=64, evals_per_epoch=1)  # fmt: skip
    result = compare(data, options, root / "out", command="dare compare --test", progress=False)
    return root / "out", data, result


def test_the_grid_compares_equal_dims_plus_decoupled_dare_rows() -> None:
    """The paper's table compares DARE and TWIN at the same dim: a DARE row of attention dim d has representation
    dim d too (before the fix it was always 64), and DARE att 16 / repr 64 is an extra row beside them."""
    cells = CompareOptions().cells()
    assert cells == [
        ("dare", 16, 16), ("dare", 32, 32), ("dare", 64, 64), ("dare", 16, 64),
        ("twin", 16, 16), ("twin", 32, 32), ("twin", 64, 64),
        ("twin-proj", 16, 16), ("twin-proj", 32, 32), ("twin-proj", 64, 64),
        ("dare-recency", 16, 16), ("dare-recency", 32, 32), ("dare-recency", 64, 64),
    ]  # fmt: skip
    runs = CompareOptions().runs()
    assert len(runs) == len(cells) * 5  # five seeds by default
    recency = next(o for name, label, o in runs if label == "dare-recency")
    assert recency.model == "dare" and recency.search == "recency"
    assert all(o.aux_loss and o.patience == 4 and o.epochs == 20 for _, _, o in runs)


def test_compare_writes_baselines_table_verdicts_json_and_charts(tiny_compare: tuple[Path, Path, object]) -> None:
    out, _, result = tiny_compare
    runs = json.loads((out / "results.json").read_text())
    assert runs["complete"] is True and len(runs["runs"]) == (4 * 2 + 1) * 2
    names = {r["name"] for r in runs["runs"]}
    assert {"dare-att4-repr4-seed0", "dare-att4-repr8-seed1", "twin-att4-repr4-seed0", "twin-proj-att8-repr8-seed0",
            "dare-recency-att8-repr8-seed1"} <= names  # fmt: skip
    for run in runs["runs"]:
        assert 0 <= run["metrics"]["test_auc"] <= 1
        assert run["metrics"]["stop_reason"] in ("patience", "max_epochs")
        assert (Path(run["run_dir"]) / "model.pt").is_file()
    assert [b["name"] for b in runs["baselines"]][:2] == ["random", "popularity"]
    assert all(set(b) == {"name", "test_auc", "test_gauc"} for b in runs["baselines"])
    table = (out / "results.md").read_text()
    assert "dare compare --test" in table and "SYNTHETIC" in table and "planted ground truth" in table
    assert table.index("## Model-free baselines") < table.index("## Models") < table.index("## The paper's claims")
    assert "| logistic regression |" in table
    verdict_lines = [line for line in table.splitlines() if line.startswith("- **")]
    assert len(verdict_lines) == 6 == len(runs["verdicts"])
    assert all(v["verdict"] in ("holds", "does not hold", "cannot tell") for v in runs["verdicts"])
    dare_4 = next(r for r in runs["summary"] if r["model"] == "dare" and r["att_dim"] == 4 and r["repr_dim"] == 4)
    run_aucs = [r["metrics"]["test_auc"] for r in runs["runs"] if r["name"].startswith("dare-att4-repr4-")]
    assert dare_4["test_auc"]["mean"] == pytest.approx(sum(run_aucs) / 2)
    for name in ("results.png", "learning_curves.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_reuses_finished_runs(tiny_compare: tuple[Path, Path, object]) -> None:
    out, data, first = tiny_compare
    model_file = out / "runs" / "dare-att4-repr4-seed0" / "model.pt"
    before = model_file.stat().st_mtime_ns
    options = CompareOptions(models=("dare",), att_dims=(4,), decoupled=(), seeds=1, top_k=5, epochs=2, patience=1,
                             batch_size=64, evals_per_epoch=1)  # fmt: skip
    again = compare(data, options, out, progress=False)
    assert model_file.stat().st_mtime_ns == before  # not retrained
    assert again.runs[0]["metrics"]["test_auc"] == first.runs[0]["metrics"]["test_auc"]  # type: ignore[attr-defined]


def _run(label: str, dim: int, seed: int, auc: float, ndcg: float = 0.5, repr_dim: int | None = None) -> dict:
    return {"label": label, "att_dim": dim, "repr_dim": repr_dim or dim, "seed": seed,
            "metrics": {"test_auc": auc, "test_ndcg_at_k": ndcg, "train_seconds": 1.0, "best_epoch": 1.0}}  # fmt: skip


def test_summary_mean_and_std_over_seeds() -> None:
    runs = [_run("dare", 16, s, a, repr_dim=64) for s, a in enumerate((0.70, 0.72, 0.74))]
    (row,) = summarise(runs, [("dare", 16, 64)])
    assert row["runs"] == 3
    assert row["test_auc"]["mean"] == pytest.approx(0.72)
    assert row["test_auc"]["std"] == pytest.approx(0.02)  # sample std (ddof=1)


def test_paired_difference_pairs_seeds_and_gives_a_t_interval() -> None:
    runs = [_run("dare", 8, s, 0.80 + d) for s, d in enumerate((0.01, 0.02, 0.03))]
    runs += [_run("twin", 8, s, 0.80) for s in (2, 1, 0)]
    p = paired(runs, ("dare", 8, 8), ("twin", 8, 8), "test_auc")
    assert p is not None and p["n"] == 3 and p["mean"] == pytest.approx(0.02)
    half = 4.302652729911275 * 0.01 / 3**0.5  # t(0.975, 2) * sd / sqrt(n)
    assert p["low"] == pytest.approx(0.02 - half) and p["high"] == pytest.approx(0.02 + half)


def test_verdicts_are_computed_from_the_runs() -> None:
    """A made-up grid where DARE wins clearly, its search is worse, projections hurt by noise only, and a baseline
    is out of reach: each claim gets the verdict the numbers imply."""
    options = CompareOptions(att_dims=(16, 64), decoupled=((16, 64),), seeds=5)
    noise = (0.001, -0.002, 0.0015, -0.001, 0.0005)
    runs = []
    for s, e in enumerate(noise):
        for d in (16, 64):
            runs += [_run("dare", d, s, 0.80 + e, ndcg=0.3), _run("twin", d, s, 0.78 + (d == 64) * 0.01, ndcg=0.5),
                     _run("twin-proj", d, s, 0.78 + (d == 64) * 0.01 + e), _run("dare-recency", d, s, 0.80 + e + 0.0001)]  # fmt: skip
        runs.append(_run("dare", 16, s, 0.80 + e, ndcg=0.3, repr_dim=64))
    result = {v["claim"].split(" (")[0]: v["verdict"] for v in verdicts(runs, options, [{"name": "lr", "test_auc": 0.9, "test_gauc": 0.9}])}
    assert result["DARE > TWIN in test AUC at equal dims"] == "holds"
    assert result["DARE's search NDCG > TWIN's at equal dims"] == "does not hold"
    assert result["DARE loses < 0.3 AUC points from d_att 64 to 16 while TWIN loses more"] == "holds"
    assert result["TWIN-proj < TWIN in test AUC"] == "cannot tell"
    assert result["DARE's search beats the K most recent behaviours"] == "does not hold"
    assert result["DARE > the best model-free baseline"] == "does not hold"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": ("dare", "din")}, "unknown model"),
        ({"models": ()}, "--models is empty"),
        ({"att_dims": (16, 0)}, "--att-dims must be positive"),
        ({"seeds": 0}, "--seeds must be >= 1"),
    ],
)
def test_bad_compare_options(kwargs: dict, message: str) -> None:
    with pytest.raises(DareError, match=message):
        CompareOptions(**kwargs)


def test_cli_reports_bad_options_in_one_line(tmp_path: Path) -> None:
    """The real `dare` entry point: exit code 2 and a one-line message, no traceback."""
    cases = [
        (["compare", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--att-dims", "16,x"], "--att-dims"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--model", "twin", "--repr-dim", "64"],
         "must be equal"),
    ]  # fmt: skip
    for args, message in cases:
        done = subprocess.run([sys.executable, "-m", "dare.cli", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_subsample_keeps_whole_users_and_the_same_draw_for_every_model(tmp_path: Path) -> None:
    from training.train import load_prepared, subsample_train

    data = load_prepared(make_prepared(tmp_path / "data", users=40, train_per_user=3, history_len=10))
    half = subsample_train(data, 0.5)
    users = set(half.train.user.tolist())
    assert len(users) == 20 and half.train.rows == 20 * 3  # whole users: all 3 samples of each kept user
    assert half.val is data.val and half.test is data.test
    np.testing.assert_array_equal(subsample_train(data, 0.5).train.hist_item, half.train.hist_item)
    assert subsample_train(data, 1.0) is data
    with pytest.raises(DareError, match="fraction must be in"):
        subsample_train(data, 0.0)


def test_curve_writes_a_point_per_fraction_with_baselines(tmp_path: Path) -> None:
    from training.curve import CurveOptions, curve

    data = make_prepared(tmp_path / "data", users=40, train_per_user=3, history_len=10)
    options = CurveOptions(rows=(("dare", 4, 4),), fractions=(0.5, 1.0), seeds=1, epochs=1, patience=1, batch_size=64)
    result = curve(data, options, tmp_path / "out", progress=False)
    assert [p["train_rows"] for p in result["points"]] == [60, 120]
    assert all(len(p["runs"]) == 1 and len(p["baselines"]) == 7 for p in result["points"])
    table = (tmp_path / "out" / "curve.md").read_text()
    assert "| 50% | 60 |" in table and "| 100% | 120 |" in table
    assert (tmp_path / "out" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    before = (tmp_path / "out" / "runs" / "frac0.5-dare-att4-repr4-seed0" / "model.pt").stat().st_mtime_ns
    curve(data, options, tmp_path / "out", progress=False)  # resumes: nothing retrained
    assert (tmp_path / "out" / "runs" / "frac0.5-dare-att4-repr4-seed0" / "model.pt").stat().st_mtime_ns == before
