"""`dare synth`: format, ground truth, determinism, the planted signal, and its trip through `dare prepare`."""

from __future__ import annotations

import csv
import gzip
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import orjson
import pytest
import typer
from typer.testing import CliRunner

from dare_common import DareError
from training import cli
from training.config import PrepareConfig
from training.prepare import benchmark, prepare
from training.synth import SynthConfig, generate, write_log

SMALL = SynthConfig(users=60, events_per_user=150, categories=30, items=2000, seed=7)


def _truth(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _category_index(cate_raw: np.ndarray, raw: np.ndarray) -> np.ndarray:
    order = np.argsort(cate_raw)
    return order[np.searchsorted(cate_raw[order], raw)]


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small.csv.gz"
    write_log(SMALL, out, progress=False)
    return out


def test_log_has_the_taobao_format_and_truth_beside_it(small_log: Path) -> None:
    with gzip.open(small_log, "rt", newline="") as fh:
        rows = [(int(u), int(i), int(c), b, int(t)) for u, i, c, b, t in csv.reader(fh)]
    assert len(rows) == SMALL.users * SMALL.events_per_user
    assert {r[3] for r in rows} == {"pv"}
    assert all(SMALL.min_timestamp <= r[4] < SMALL.max_timestamp for r in rows)
    users = [r[0] for r in rows]
    assert users == sorted(users), "user-major, like the real file"
    assert all(a[4] <= b[4] for a, b in zip(rows, rows[1:]) if a[0] == b[0]), "chronological per user"

    truth = _truth(small_log.with_name("small.truth.npz"))
    assert "SYNTHETIC" in str(truth["synthetic"])
    c = SMALL.categories
    assert truth["cate_raw"].shape == (c,) and len(set(truth["cate_raw"].tolist())) == c
    relation = truth["relation"]
    assert relation.shape == (c, c) and (relation >= 0).all()
    np.testing.assert_allclose(relation.sum(axis=0), 1.0)  # each history category's pull sums to 1
    assert (np.diag(relation) > 0).all()
    assert ((relation > 0).sum(axis=0) == 1 + SMALL.related_per_category).all()
    decay = truth["decay"]
    assert decay.shape == (SMALL.events_per_user + 1,) and decay[0] == 0 and decay[1] == 1
    np.testing.assert_allclose(decay[2:] / decay[1:-1], SMALL.decay)
    # Every item has exactly one category, the one the truth says.
    item_cate = dict(zip(truth["item_raw"].tolist(), truth["item_cate_raw"].tolist(), strict=True))
    assert all(item_cate[r[1]] == r[2] for r in rows)
    assert set(item_cate.values()) == set(truth["cate_raw"].tolist())  # every category has an item
    config = orjson.loads(str(truth["config"]))
    assert config["seed"] == SMALL.seed and config["users"] == SMALL.users


def test_same_seed_same_log_other_seed_other_log(tmp_path: Path) -> None:
    a = write_log(SMALL, tmp_path / "a.csv", progress=False)
    b = write_log(SMALL, tmp_path / "b.csv", progress=False)
    c = write_log(SynthConfig(**{**SMALL.__dict__, "seed": 8}), tmp_path / "c.csv", progress=False)
    assert a.log.read_bytes() == b.log.read_bytes() != c.log.read_bytes()
    ta, tb = _truth(a.truth), _truth(b.truth)
    for name in ("relation", "decay", "cate_raw", "item_raw"):
        np.testing.assert_array_equal(ta[name], tb[name])


def test_planted_signal_is_present() -> None:
    """The next category follows the truth: recency-weighted relation to earlier categories, and Zipf items."""
    cfg = SynthConfig(users=300, events_per_user=300, categories=100, items=20000, seed=3)
    log = generate(cfg)
    truth = log.truth
    g = cfg.decay
    # Off the diagonal only: repeats of a user's interest categories would look "relevant" even without the relation.
    cross = truth["relation"].copy()
    np.fill_diagonal(cross, 0.0)
    cats = _category_index(truth["cate_raw"], log.cate).reshape(cfg.users, cfg.events_per_user)  # (U, N)
    rows = np.arange(cfg.users)
    # score[u, t] = sum over earlier events i of cross[t, c_i] * g**(p_i - 1), accumulated step by step.
    score = np.zeros((cfg.users, cfg.categories))
    rng = np.random.default_rng(0)
    actual, random = [], []
    for j in range(cfg.events_per_user):
        if j:
            p = score / np.maximum(score.sum(axis=1, keepdims=True), 1e-12)  # (U, C) truth's cross-category pull
            actual.append(p[rows, cats[:, j]])
            random.append(p[rows, rng.integers(0, cfg.categories, cfg.users)])
        score = g * score + cross[:, cats[:, j]].T
    assert np.mean(actual) > 3 * np.mean(random)  # ~4x with the defaults; below 1x without the relation
    relation = truth["relation"]
    # Relevance decays with recency: the event p steps back is related to the current one less often as p grows.
    related = [(relation[cats[:, p:], cats[:, :-p]] > 0).mean() for p in (1, 5, 20, 100)]
    assert related == sorted(related, reverse=True) and related[0] > 1.5 * related[-1]
    # Zipf popularity: a few items take a large share of the events.
    _, counts = np.unique(log.item, return_counts=True)
    top = np.sort(counts)[::-1][: len(counts) // 100].sum() / counts.sum()
    assert top > 0.15


def test_lifelong_sequences(tmp_path: Path) -> None:
    result = write_log(SynthConfig(users=2, events_per_user=20000, seed=1), tmp_path / "long.csv", progress=False)
    assert result.rows == 40000
    assert _truth(result.truth)["decay"].shape == (20001,)


def test_prepare_copies_the_truth_remapped_to_category_rows(small_log: Path, tmp_path: Path) -> None:
    result = prepare(PrepareConfig(history_len=50), small_log, tmp_path / "prepared", progress=False)
    assert result.synthetic and result.meta["synthetic"] is True and result.meta["truth"] == "truth.npz"
    assert "SYNTHETIC" in result.meta["note"]
    assert result.meta["counts"]["rows_kept"] == SMALL.users * SMALL.events_per_user  # nothing dropped
    source = _truth(small_log.with_name("small.truth.npz"))
    copied = _truth(tmp_path / "prepared" / "truth.npz")
    assert "SYNTHETIC" in str(copied["synthetic"])
    with np.load(tmp_path / "prepared" / "vocab.npz") as vocab:
        rows = vocab["cate_index"][np.searchsorted(vocab["cate_raw"], source["cate_raw"])]  # (C,) row of index j
    cate_rows = result.meta["cate_rows"]
    assert copied["relation"].shape == (cate_rows, cate_rows)
    np.testing.assert_array_equal(copied["relation"][np.ix_(rows, rows)], source["relation"])
    assert copied["relation"][:2].sum() == copied["relation"][:, :2].sum() == 0  # padding and OOV rows
    np.testing.assert_array_equal(copied["decay"], source["decay"])


def test_a_truth_file_of_another_log_is_refused(small_log: Path, tmp_path: Path) -> None:
    (tmp_path / "real.csv").write_text(
        "".join(f"{u},{1000 * u + i},{77 + i % 3},pv,{1511544070 + i}\n" for u in (1, 2) for i in range(6))
    )
    (tmp_path / "real.truth.npz").write_bytes(small_log.with_name("small.truth.npz").read_bytes())
    with pytest.raises(DareError, match="belongs to another log"):
        prepare(PrepareConfig(min_events=4), tmp_path / "real.csv", tmp_path / "out", progress=False)


def test_bad_options_are_named(tmp_path: Path) -> None:
    cases = [
        ({"users": 0}, "--users must be >= 1"),
        ({"items": 5, "categories": 10}, r"--items \(5\) must be >= --categories"),
        ({"decay": 1.0}, r"--decay must be in \(0, 1\)"),
        ({"explore": 1.5}, "--explore"),
        ({"related_per_category": 10, "categories": 10}, "--related-per-category"),
    ]
    for overrides, message in cases:
        with pytest.raises(DareError, match=message):
            write_log(SynthConfig(**{**SMALL.__dict__, **overrides}), tmp_path / "x.csv", progress=False)
    with pytest.raises(DareError, match="must end in .csv or .csv.gz"):
        write_log(SMALL, tmp_path / "x.txt", progress=False)


def test_cli_defaults_match_the_configs() -> None:
    """The CLI spells its defaults out (so `dare --help` needs no numpy); they must not drift from the configs."""
    synth_defaults = {f.name: f.default for f in fields(SynthConfig)}
    names = {"interests": "interests_per_user", "related": "related_per_category"}
    for name, param in inspect.signature(cli.synth).parameters.items():
        if name in ("out", "progress"):
            continue
        assert param.default == synth_defaults[names.get(name, name)], name
    prepare_defaults = PrepareConfig()
    params = inspect.signature(cli.prepare).parameters
    assert params["min_events"].default == prepare_defaults.min_events
    assert params["negatives"].default == prepare_defaults.negatives_per_positive
    assert params["behaviors"].default == ",".join(prepare_defaults.behaviors)


def test_cli_says_synthetic_and_prepare_cli_too(tmp_path: Path) -> None:
    app = typer.Typer()
    cli.register(app)
    runner = CliRunner()
    log = tmp_path / "s.csv"
    done = runner.invoke(app, ["synth", "--users", "20", "--events-per-user", "40", "--out", str(log), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "SYNTHETIC" in done.output and log.is_file() and (tmp_path / "s.truth.npz").is_file()
    done = runner.invoke(app, ["prepare", "--input", str(log), "--out", str(tmp_path / "p"), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "SYNTHETIC" in done.output


def test_cli_bad_option_exits_2_with_one_clean_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dare.cli", "synth", "--out", str(tmp_path / "x.csv"), "--decay", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: --decay must be in (0, 1), got 2.0"]


def test_bench_prepare_writes_json_and_png(tmp_path: Path) -> None:
    report = benchmark(20000, 200, tmp_path / "bench.json", work_dir=tmp_path / "work", progress=False)
    written = orjson.loads((tmp_path / "bench.json").read_bytes())
    assert written["rows"] == report["rows"] == 20000
    assert written["rows_per_second"] > 0 and written["rows_per_cpu_second"] > 0 and written["samples"]["test"] == 100
    assert "SYNTHETIC" in written["what"]
    assert (tmp_path / "bench.png").stat().st_size > 0
