"""`dare compare`: a 1-seed tiny grid writes the table, the JSON of every run and the chart; resume; bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dare.errors import DareError
from tests.training.test_train import make_prepared
from training.compare import CompareOptions, compare, summarise


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("compare")
    data = make_prepared(root / "data", users=60, train_per_user=3, history_len=20)
    options = CompareOptions(att_dims=(4, 8), repr_dim=8, seeds=1, top_k=5, epochs=1, batch_size=64, evals_per_epoch=1)
    result = compare(data, options, root / "out", command="dare compare --test", progress=False)
    return root / "out", data, result


def test_compare_writes_table_json_and_chart(tiny_compare: tuple[Path, Path, object]) -> None:
    out, _, result = tiny_compare
    runs = json.loads((out / "results.json").read_text())
    assert runs["complete"] is True and len(runs["runs"]) == 3 * 2
    names = {r["name"] for r in runs["runs"]}
    # DARE keeps its representation dim; TWIN's single table is the attention dim.
    assert "dare-att4-repr8-seed0" in names and "twin-att4-repr4-seed0" in names and "twin-proj-att8-repr8-seed0" in names
    for run in runs["runs"]:
        assert 0 <= run["metrics"]["test_auc"] <= 1
        assert (Path(run["run_dir"]) / "model.pt").is_file()
    table = (out / "results.md").read_text()
    assert "dare compare --test" in table and "SYNTHETIC" in table and "planted ground truth" in table
    assert runs["ndcg_baselines"]["random"] < runs["ndcg_baselines"]["recency"]
    rows = [line for line in table.splitlines() if line.startswith("| dare |") or line.startswith("| twin")]
    assert len(rows) == 6 + 3  # 6 rows in the main table, 3 in the paper-layout table
    dare_4 = next(r for r in runs["summary"] if r["model"] == "dare" and r["att_dim"] == 4)
    run_auc = next(r for r in runs["runs"] if r["name"] == "dare-att4-repr8-seed0")["metrics"]["test_auc"]
    assert dare_4["test_auc"]["mean"] == pytest.approx(run_auc)
    assert f"{run_auc:.4f}" in table
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_reuses_finished_runs(tiny_compare: tuple[Path, Path, object]) -> None:
    out, data, first = tiny_compare
    model_file = out / "runs" / "dare-att4-repr8-seed0" / "model.pt"
    before = model_file.stat().st_mtime_ns
    options = CompareOptions(models=("dare",), att_dims=(4,), repr_dim=8, seeds=1, top_k=5, epochs=1, batch_size=64,
                             evals_per_epoch=1)  # fmt: skip
    again = compare(data, options, out, progress=False)
    assert model_file.stat().st_mtime_ns == before  # not retrained
    assert again.runs[0]["metrics"]["test_auc"] == first.runs[0]["metrics"]["test_auc"]  # type: ignore[attr-defined]


def test_summary_mean_and_std_over_seeds() -> None:
    runs = [
        {"model": "dare", "att_dim": 16, "repr_dim": 64, "metrics": {"test_auc": a, "train_seconds": 1.0}}
        for a in (0.70, 0.72, 0.74)
    ]
    (row,) = summarise(runs)
    assert row["runs"] == 3
    assert row["test_auc"]["mean"] == pytest.approx(0.72)
    assert row["test_auc"]["std"] == pytest.approx(0.02)  # sample std (ddof=1)


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
