"""`dare compare`: DARE vs TWIN vs TWIN-proj (and DARE with recency instead of search) against model-free
baselines, over attention dims and seeds, with paired differences and a computed verdict on each paper claim.

The grid follows the paper's comparison (docs/results.md explains each row):
- equal dims: every model at attention dim = representation dim = d for d in `att_dims` (the paper's table);
- decoupled: DARE at attention dim a, representation dim r for each (a, r) in `decoupled` (default 16 / 64), the
  configuration DARE exists for (a small search table beside a full-size representation table);
- "dare-recency": DARE whose ESU pools the K most recent behaviours instead of the K it searched for, so the value
  of the search itself is measured.
Every (row, seed) is trained with `training.train.train` (early stopping on validation AUC) into
OUT/runs/<name>/ (a normal run folder), the seeds are paired (seed s of one row against seed s of another), and

    OUT/results.json         every run's metrics, the baselines, the paired differences and the verdicts
    OUT/results.md           baselines, then mean ± std over seeds per row, paired differences, verdicts
    OUT/results.png          test AUC and search NDCG@K vs attention dim per model (equal dims)
    OUT/learning_curves.png  validation AUC vs training samples seen, per model, every seed

A run folder whose metrics.json already records the same options is reused, so an interrupted compare resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from training.baselines import evaluate_baselines
from training.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_EVALS_PER_EPOCH,
    DEFAULT_PATIENCE,
    PreparedData,
    TrainError,
    TrainOptions,
    load_prepared,
    retrieval_baselines,
    train,
)

# Row labels of the grid -> (model kind, search).
COMPARE_MODELS: dict[str, tuple[str, str]] = {
    "dare": ("dare", "topk"),
    "twin": ("twin", "topk"),
    "twin-proj": ("twin-proj", "topk"),
    "dare-recency": ("dare", "recency"),
}
# The paper's Taobao claims (docs/results.md): DARE loses less than this much AUC when d_att drops from 64 to 16.
SMALL_LOSS_AUC = 0.003
CONFIDENCE = 0.95
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
CURVES_PNG = "learning_curves.png"
# Columns of the table: (metrics.json key, heading, digits).
TABLE_METRICS = (
    ("test_auc", "test AUC", 4),
    ("test_gauc", "test GAUC (per user)", 4),
    ("test_logloss", "test logloss", 4),
    ("test_ndcg_at_k", "NDCG@K", 4),
    ("test_category_gauc", "category GAUC (ref. code)", 4),
)


@dataclass(frozen=True)
class CompareOptions:
    models: tuple[str, ...] = tuple(COMPARE_MODELS)
    att_dims: tuple[int, ...] = (16, 32, 64)
    decoupled: tuple[tuple[int, int], ...] = ((16, 64),)  # DARE (att dim, repr dim) rows beside the equal dims
    seeds: int = 5
    top_k: int = 20
    epochs: int = DEFAULT_EPOCHS  # the cap; early stopping decides
    patience: int = DEFAULT_PATIENCE
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 0.01
    aux_loss: bool = True
    device: str = "auto"
    evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH

    def __post_init__(self) -> None:
        if not self.models:
            raise TrainError("--models is empty: name at least one of " + ", ".join(COMPARE_MODELS))
        unknown = [m for m in self.models if m not in COMPARE_MODELS]
        if unknown:
            raise TrainError(f"--models: unknown model(s) {unknown}; choose from {', '.join(COMPARE_MODELS)}")
        if len(set(self.models)) != len(self.models):
            raise TrainError(f"--models names a model twice: {list(self.models)}")
        if not self.att_dims or any(d < 1 for d in self.att_dims):
            raise TrainError(f"--att-dims must be positive integers, got {list(self.att_dims)}")
        if len(set(self.att_dims)) != len(self.att_dims):
            raise TrainError(f"--att-dims names a dim twice: {list(self.att_dims)}")
        if any(a < 1 or r < 1 for a, r in self.decoupled):
            raise TrainError(f"--decoupled dims must be positive, got {list(self.decoupled)}")
        if self.seeds < 1:
            raise TrainError(f"--seeds must be >= 1, got {self.seeds}")

    def cells(self) -> list[tuple[str, int, int]]:
        """(row label, att dim, repr dim) of every row of the grid, in table order."""
        out = [(label, d, d) for label in self.models for d in sorted(self.att_dims)]
        if "dare" in self.models:
            at = out.index(("dare", max(self.att_dims), max(self.att_dims))) + 1
            extra = [("dare", a, r) for a, r in self.decoupled if a != r]
            out[at:at] = extra
        return out

    def runs(self) -> list[tuple[str, str, TrainOptions]]:
        """(run name, row label, options) for every cell of the grid x seeds."""
        out = []
        for label, att, rep in self.cells():
            model, search = COMPARE_MODELS[label]
            for seed in range(self.seeds):
                options = TrainOptions(
                    model=model, search=search, att_dim=att, repr_dim=rep, top_k=self.top_k, epochs=self.epochs,
                    patience=self.patience, batch_size=self.batch_size, lr=self.lr, seed=seed, aux_loss=self.aux_loss,
                    device=self.device, evals_per_epoch=self.evals_per_epoch,
                )  # fmt: skip
                out.append((f"{label}-att{att}-repr{rep}-seed{seed}", label, options))
        return out


def _reusable(run_dir: Path, options: TrainOptions, fingerprint: str) -> dict[str, object] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(metrics, dict) or metrics.get("data_fingerprint") != fingerprint:
        return None
    return metrics if options.same_as_recorded(metrics.get("options")) else None


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _cell(run: dict[str, object]) -> tuple[str, int, int]:
    return str(run["label"]), int(run["att_dim"]), int(run["repr_dim"])  # type: ignore[call-overload]


def summarise(runs: list[dict[str, object]], cells: list[tuple[str, int, int]]) -> list[dict[str, object]]:
    """One row per grid cell (label, att dim, repr dim): mean and std over seeds of every table metric."""
    rows = []
    for label, att, rep in cells:
        group = [r for r in runs if _cell(r) == (label, att, rep)]
        if not group:
            continue
        row: dict[str, object] = {"model": label, "att_dim": att, "repr_dim": rep, "runs": len(group)}
        for key, _, _ in TABLE_METRICS + (("train_seconds", "", 0), ("best_epoch", "", 0)):
            mean, std = mean_std([g["metrics"].get(key) for g in group])  # type: ignore[union-attr]
            row[key] = {"mean": mean, "std": std}
        row["stopped_by_patience"] = sum(g["metrics"].get("stop_reason") == "patience" for g in group)  # type: ignore[union-attr]
        rows.append(row)
    return rows


def paired(runs: list[dict[str, object]], a: tuple[str, int, int], b: tuple[str, int, int], metric: str) -> dict[str, object] | None:
    """Mean of metric(a, seed s) - metric(b, seed s) over the seeds both cells have, with a t interval."""
    by_seed = {key: {int(r["seed"]): r["metrics"].get(metric) for r in runs if _cell(r) == key} for key in (a, b)}  # type: ignore[union-attr, call-overload]
    seeds = sorted(s for s in by_seed[a] if s in by_seed[b] and by_seed[a][s] is not None and by_seed[b][s] is not None)
    if not seeds:
        return None
    diffs = np.array([by_seed[a][s] - by_seed[b][s] for s in seeds], dtype=np.float64)  # type: ignore[operator]
    return {"a": list(a), "b": list(b), "metric": metric, **_interval(diffs)}


def _interval(diffs: np.ndarray) -> dict[str, object]:
    """Mean and two-sided CONFIDENCE t interval of paired differences (no interval from a single pair)."""
    n, mean = len(diffs), float(diffs.mean())
    if n < 2:
        return {"n": n, "mean": mean, "low": float("nan"), "high": float("nan"), "diffs": diffs.tolist()}
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "diffs": diffs.tolist()}


def _sign(interval: dict[str, object] | None, margin: float = 0.0) -> str:
    """'holds' when the interval lies above `margin`, 'does not hold' when it lies below, else 'cannot tell'."""
    if interval is None or not math.isfinite(float(interval["low"])):  # type: ignore[arg-type]
        return "cannot tell"
    if float(interval["low"]) > margin:  # type: ignore[arg-type]
        return "holds"
    if float(interval["high"]) < margin:  # type: ignore[arg-type]
        return "does not hold"
    return "cannot tell"


def _pooled(runs: list[dict[str, object]], pairs: list[tuple[tuple[str, int, int], tuple[str, int, int]]], metric: str) -> dict[str, object] | None:
    """Paired differences pooled over several (a, b) cell pairs (e.g. every equal dim), one pair per seed and dim."""
    diffs: list[float] = []
    for a, b in pairs:
        one = paired(runs, a, b, metric)
        if one is not None:
            diffs += one["diffs"]  # type: ignore[arg-type]
    return _interval(np.array(diffs)) if diffs else None


def _fmt_interval(i: dict[str, object] | None, digits: int = 4) -> str:
    if i is None:
        return "n/a"
    low, high = float(i["low"]), float(i["high"])  # type: ignore[arg-type]
    ci = f" [{low:+.{digits}f}, {high:+.{digits}f}]" if math.isfinite(low) else " (one seed: no interval)"
    return f"{float(i['mean']):+.{digits}f}{ci}, n={i['n']}"  # type: ignore[arg-type]


def verdicts(runs: list[dict[str, object]], options: CompareOptions, baselines: list[dict[str, object]]) -> list[dict[str, str]]:
    """One line per paper claim, computed from the runs: holds / does not hold / cannot tell at this sample size."""
    dims = sorted(options.att_dims)
    have = {_cell(r) for r in runs}
    out: list[dict[str, str]] = []

    def claim(text: str, verdict: str, evidence: str) -> None:
        out.append({"claim": text, "verdict": verdict, "evidence": evidence})

    equal = [(("dare", d, d), ("twin", d, d)) for d in dims if ("dare", d, d) in have and ("twin", d, d) in have]
    if equal:
        i = _pooled(runs, equal, "test_auc")
        claim("DARE > TWIN in test AUC at equal dims", _sign(i),
              f"paired DARE − TWIN over dims {', '.join(str(a[1]) for a, _ in equal)} × seeds: {_fmt_interval(i)}")
        i = _pooled(runs, equal, "test_ndcg_at_k")
        claim("DARE's search NDCG > TWIN's at equal dims", _sign(i),
              f"paired DARE − TWIN NDCG@K over the same pairs: {_fmt_interval(i)}")
    small, large = min(dims), max(dims)
    decoupled = ("dare", small, large) if ("dare", small, large) in have else ("dare", small, small)
    if small != large and {("dare", large, large), decoupled, ("twin", large, large), ("twin", small, small)} <= have:
        dare_loss = paired(runs, ("dare", large, large), decoupled, "test_auc")
        twin_loss = paired(runs, ("twin", large, large), ("twin", small, small), "test_auc")
        assert dare_loss is not None and twin_loss is not None
        extra = _interval(np.array(twin_loss["diffs"]) - np.array(dare_loss["diffs"])) if twin_loss["n"] == dare_loss["n"] else None  # type: ignore[arg-type]
        small_enough = _sign({**dare_loss, "low": -float(dare_loss["high"]), "high": -float(dare_loss["low"])}, -SMALL_LOSS_AUC)  # type: ignore[arg-type]
        less_than_twin = _sign(extra)
        verdict = ("holds" if small_enough == less_than_twin == "holds" else
                   "does not hold" if "does not hold" in (small_enough, less_than_twin) else "cannot tell")  # fmt: skip
        claim(f"DARE loses < {SMALL_LOSS_AUC * 100:.1f} AUC points from d_att {large} to {small} while TWIN loses more",
              verdict,
              f"DARE att{large}/repr{large} − att{decoupled[1]}/repr{decoupled[2]}: {_fmt_interval(dare_loss)}; "
              f"TWIN {large} − {small}: {_fmt_interval(twin_loss)}; TWIN's loss − DARE's: {_fmt_interval(extra)}")
    proj = [(("twin", d, d), ("twin-proj", d, d)) for d in dims if ("twin", d, d) in have and ("twin-proj", d, d) in have]
    if proj:
        i = _pooled(runs, proj, "test_auc")
        claim("TWIN-proj < TWIN in test AUC (projections hurt)", _sign(i), f"paired TWIN − TWIN-proj: {_fmt_interval(i)}")
    recency = [(("dare", d, d), ("dare-recency", d, d)) for d in dims if ("dare", d, d) in have and ("dare-recency", d, d) in have]
    if recency:
        i = _pooled(runs, recency, "test_auc")
        claim("DARE's search beats the K most recent behaviours (DARE > DARE-recency)", _sign(i),
              f"paired DARE − DARE-recency: {_fmt_interval(i)}")
    dare_cells = [c for c in options.cells() if c[0] == "dare" and c in have]
    if dare_cells and baselines:
        best = max(baselines, key=lambda b: float(b["test_auc"]))  # type: ignore[arg-type]
        scored = []
        for cell in dare_cells:
            values = np.array([r["metrics"]["test_auc"] for r in runs if _cell(r) == cell], dtype=np.float64)  # type: ignore[index]
            scored.append((cell, _interval(values - float(best["test_auc"]))))  # type: ignore[arg-type]
        cell, i = max(scored, key=lambda ci: float(ci[1]["mean"]))  # type: ignore[arg-type]
        claim(f"DARE > the best model-free baseline ({best['name']}, test AUC {float(best['test_auc']):.4f})",  # type: ignore[arg-type]
              _sign(i), f"best DARE row att{cell[1]}/repr{cell[2]} − baseline over seeds: {_fmt_interval(i)}")
    return out


def _fmt(stat: dict[str, float], digits: int, runs: int) -> str:
    if not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if runs > 1 else "")


def _num(value: object) -> str:
    return "n/a" if not isinstance(value, int | float) or not math.isfinite(value) else f"{value:.4f}"


def render_markdown(summary: list[dict[str, object]], header: dict[str, object]) -> str:
    lines = [
        f"# DARE vs TWIN vs TWIN-proj on {header['data_name']}",
        "",
        f"- data: `{header['data_dir']}` ({header['data_kind']}), fingerprint `{str(header['data_fingerprint'])[:16]}…`",
        f"- samples: {header['samples']}",
        f"- command: `{header['command']}`",
        f"- grid: rows {', '.join(header['models'])} at equal dims {', '.join(map(str, header['att_dims']))}"  # type: ignore[arg-type]
        + (f", DARE also at att/repr {', '.join(f'{a}/{r}' for a, r in header['decoupled'])}" if header["decoupled"] else "")  # type: ignore[union-attr]
        + f"; {header['seeds']} seed(s) per row; top-K {header['top_k']}, batch {header['batch_size']}, lr {header['lr']}, "
        f"aux loss {'on' if header['aux_loss'] else 'off'}",
        f"- budget: early stopping on validation AUC ({header['evals_per_epoch']} evaluations per epoch, stop after "
        f"{header['patience']} without a better one, at most {header['epochs']} epochs), the same rule for every model; "
        "the best checkpoint is evaluated once on test",
        f"- NDCG@K: the search stage's top-K against the {header['ndcg_truth']} ground truth; model-free rankings "
        f"for scale: the K most recent behaviours {_num(header['ndcg_baselines']['recency'])}, "  # type: ignore[index]
        f"K at random {_num(header['ndcg_baselines']['random'])}",  # type: ignore[index]
        f"- values: mean ± std (sample std over seeds); paired differences: mean over seeds with a "
        f"{CONFIDENCE:.0%} t interval; training wall time summed over runs {header['total_train_seconds']:.0f} s",
        "",
        "## Model-free baselines (same test impressions; fit on the training split only, see training/baselines.py)",
        "",
        "| baseline | test AUC | test GAUC (per user) |",
        "|---|---:|---:|",
    ]
    for b in header["baselines"]:  # type: ignore[attr-defined]
        lines.append(f"| {b['name']} | {b['test_auc']:.4f} | {b['test_gauc']:.4f} |")
    lines += [
        "",
        "## Models",
        "",
        "| model | att dim | repr dim | runs | " + " | ".join(h for _, h, _ in TABLE_METRICS) + " | best epoch | train s |",
        "|---|---:|---:|---:|" + "---:|" * (len(TABLE_METRICS) + 2),
    ]
    for row in summary:
        runs = int(row["runs"])  # type: ignore[arg-type]
        cells = [_fmt(row[key], digits, runs) for key, _, digits in TABLE_METRICS]  # type: ignore[arg-type]
        cells += [_fmt(row["best_epoch"], 1, runs), _fmt(row["train_seconds"], 0, runs)]  # type: ignore[arg-type]
        lines.append(f"| {row['model']} | {row['att_dim']} | {row['repr_dim']} | {runs} | " + " | ".join(cells) + " |")
    dims = sorted({int(r["att_dim"]) for r in summary if r["att_dim"] == r["repr_dim"]})  # type: ignore[call-overload]
    lines += ["", "Test AUC at equal dims (the paper's layout):", "",
              "| model | " + " | ".join(f"dim {d}" for d in dims) + " |", "|---|" + "---:|" * len(dims)]  # fmt: skip
    for model in dict.fromkeys(str(r["model"]) for r in summary):
        by_dim = {int(r["att_dim"]): r for r in summary if r["model"] == model and r["att_dim"] == r["repr_dim"]}  # type: ignore[call-overload]
        cells = [_fmt(by_dim[d]["test_auc"], 4, int(by_dim[d]["runs"])) if d in by_dim else "" for d in dims]  # type: ignore[arg-type, call-overload]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if header["paired"]:
        lines += ["", f"Paired differences per dim (mean over seeds, {CONFIDENCE:.0%} interval):", "",
                  "| comparison | metric | dim | difference [interval], seeds |", "|---|---|---:|---|"]  # fmt: skip
        for p in header["paired"]:  # type: ignore[attr-defined]
            lines.append(f"| {p['a'][0]} − {p['b'][0]} | {p['metric']} | {p['a'][1]} | {_fmt_interval(p)} |")
    lines += ["", "## The paper's claims, computed from these runs", ""]
    for v in header["verdicts"]:  # type: ignore[attr-defined]
        lines.append(f"- **{v['verdict']}**: {v['claim']} ({v['evidence']})")
    return "\n".join(lines) + "\n"


def render_chart(summary: list[dict[str, object]], path: Path, title: str, ndcg_truth: str = "ground",
                 baselines: dict[str, float | None] | None = None, best_baseline: dict[str, object] | None = None) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    equal = [r for r in summary if r["att_dim"] == r["repr_dim"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "test_auc", "test AUC"), (axes[1], "test_ndcg_at_k", "search NDCG@K")):
        models = list(dict.fromkeys(str(r["model"]) for r in equal))
        for i, model in enumerate(models):
            rows = [r for r in equal if r["model"] == model]
            # Nudge each model sideways (on the log2 axis) so that overlapping error bars stay readable.
            nudge = 2 ** (0.05 * (i - (len(models) - 1) / 2))
            dims = [int(r["att_dim"]) * nudge for r in rows]  # type: ignore[call-overload]
            means = [r[key]["mean"] for r in rows]  # type: ignore[index]
            stds = [r[key]["std"] for r in rows]  # type: ignore[index]
            ax.errorbar(dims, means, yerr=stds, marker="o", capsize=4, label=model)
        if key == "test_ndcg_at_k":
            for (name, value), style in zip((baselines or {}).items(), (":", "--")):
                if value is not None:
                    ax.axhline(value, color="grey", linestyle=style, label=f"{name} K (no model)")
        elif best_baseline is not None:
            ax.axhline(float(best_baseline["test_auc"]), color="black", linestyle="--", label=f"{best_baseline['name']} (no model)")  # type: ignore[arg-type]
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(r["att_dim"]) for r in equal}))  # type: ignore[call-overload]
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("embedding dim per field (attention = representation)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("test AUC vs dim (error bars: std over seeds)", fontsize=10)
    axes[1].set_title(f"search top-K vs the {ndcg_truth} truth", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_learning_curves(runs: list[dict[str, object]], path: Path, title: str) -> None:
    """Validation AUC vs training samples seen, one panel per equal dim, one colour per model, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({int(r["att_dim"]) for r in runs if r["att_dim"] == r["repr_dim"]})  # type: ignore[call-overload]
    labels = list(dict.fromkeys(str(r["label"]) for r in runs))
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.8), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, dim in zip(axes[0], dims):
        for i, label in enumerate(labels):
            group = [r for r in runs if str(r["label"]) == label and r["att_dim"] == r["repr_dim"] == dim]
            for j, run in enumerate(group):
                evals = run["metrics"]["evals"]  # type: ignore[index]
                ax.plot([e["samples_seen"] for e in evals], [e["val_auc"] for e in evals], color=colours[i % len(colours)],
                        alpha=0.6, linewidth=1, label=label if j == 0 else None)  # fmt: skip
        ax.set_title(f"dim {dim}", fontsize=10)
        ax.set_xlabel("training samples seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation AUC")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"learning curves: {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class CompareResult:
    out_dir: Path
    runs: list[dict[str, object]]
    summary: list[dict[str, object]]
    markdown: str
    verdicts: list[dict[str, str]]


def compare(
    data: Path | PreparedData, options: CompareOptions, out_dir: Path, *, command: str = "", progress: bool = True
) -> CompareResult:
    """Train the whole grid (reusing finished runs), then write results.json, results.md and the charts."""
    if not isinstance(data, PreparedData):
        data = load_prepared(Path(data))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = options.runs()
    header: dict[str, object] = {
        "data_name": ("SYNTHETIC data" if data.synthetic else "real Taobao data") + f" ({data.folder.name})",
        "data_dir": str(data.folder),
        "data_kind": "synthetic, planted truth" if data.synthetic else "real behaviour log",
        "data_fingerprint": data.fingerprint,
        "samples": f"train {data.train.rows}, val {data.val.rows}, test {data.test.rows} rows "
        f"of {data.train.cand_item.shape[1]} candidates; history length {data.history_len}",
        "command": command or "dare compare",
        **{k: v for k, v in asdict(options).items()},
    }
    header["baselines"] = [b.to_dict() for b in evaluate_baselines(data)]
    runs: list[dict[str, object]] = []
    bar = tqdm(plan, desc="compare", unit="run", disable=not progress, dynamic_ncols=True)
    for name, label, run_options in bar:
        bar.set_postfix_str(name)
        run_dir = out_dir / "runs" / name
        metrics = _reusable(run_dir, run_options, data.fingerprint)
        if metrics is None:
            metrics = train(data, run_options, run_dir, progress=progress, position=1).metrics
        runs.append({"name": name, "label": label, "model": run_options.model, "search": run_options.search,
                     "att_dim": run_options.att_dim, "repr_dim": run_options.resolved_repr_dim, "seed": run_options.seed,
                     "run_dir": str(run_dir), "metrics": metrics})  # fmt: skip
        _write_json(out_dir / RESULTS_JSON, header, runs, complete=False)
    bar.close()
    header["total_train_seconds"] = sum(float(r["metrics"]["train_seconds"]) for r in runs)  # type: ignore[index]
    header["ndcg_truth"] = str(runs[0]["metrics"].get("ndcg_truth", "?")).replace("_", "-")  # type: ignore[union-attr]
    header["ndcg_baselines"] = retrieval_baselines(data, data.test, options.top_k)
    header["paired"] = [
        p for d in sorted(options.att_dims) for other in ("twin", "dare-recency") for metric in ("test_auc", "test_ndcg_at_k")
        if (p := paired(runs, ("dare", d, d), (other, d, d), metric)) is not None
    ]  # fmt: skip
    header["verdicts"] = verdicts(runs, options, header["baselines"])  # type: ignore[arg-type]
    summary = summarise(runs, options.cells())
    markdown = render_markdown(summary, header)
    (out_dir / RESULTS_MD).write_text(markdown, encoding="utf-8")
    best_baseline = max(header["baselines"], key=lambda b: b["test_auc"]) if header["baselines"] else None  # type: ignore[arg-type]
    render_chart(summary, out_dir / RESULTS_PNG, title=str(header["data_name"]), ndcg_truth=str(header["ndcg_truth"]),
                 baselines=header["ndcg_baselines"], best_baseline=best_baseline)  # type: ignore[arg-type]  # fmt: skip
    render_learning_curves(runs, out_dir / CURVES_PNG, title=str(header["data_name"]))
    _write_json(out_dir / RESULTS_JSON, header, runs, complete=True, summary=summary)
    return CompareResult(out_dir=out_dir, runs=runs, summary=summary, markdown=markdown, verdicts=header["verdicts"])  # type: ignore[arg-type]


def _write_json(path: Path, header: dict[str, object], runs: list[dict[str, object]], *, complete: bool,
                summary: list[dict[str, object]] | None = None) -> None:  # fmt: skip
    payload = {"complete": complete, **header, "summary": summary, "runs": runs}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see a half-written file
