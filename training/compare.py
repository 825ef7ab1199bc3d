"""`dare compare`: DARE vs TWIN vs TWIN-proj over attention dims and seeds, as a table and a chart.

The grid follows the paper's comparison. At "attention dim d":
- DARE has an attention table of dim d and a representation table of dim `repr_dim` (64 by default);
- TWIN and TWIN-proj have ONE table, so the whole model shrinks to dim d.
Every (model, d, seed) is trained with `training.train.train` into OUT/runs/<name>/ (a normal run folder), and

    OUT/results.json   every run's metrics (and the options and data they ran on), rewritten after each run
    OUT/results.md     mean ± std over seeds of test AUC, per-user GAUC, logloss, NDCG@K per model x dim
    OUT/results.png    test AUC (and NDCG@K) vs attention dim per model, error bars = std over seeds

A run folder whose metrics.json already records the same options is reused, so an interrupted compare resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.config import MODEL_KINDS
from training.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_EVALS_PER_EPOCH,
    PreparedData,
    TrainError,
    TrainOptions,
    load_prepared,
    retrieval_baselines,
    train,
)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
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
    models: tuple[str, ...] = MODEL_KINDS
    att_dims: tuple[int, ...] = (16, 32, 64)
    repr_dim: int = 64
    seeds: int = 3
    top_k: int = 20
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 0.01
    aux_loss: bool = False
    device: str = "auto"
    evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH

    def __post_init__(self) -> None:
        if not self.models:
            raise TrainError("--models is empty: name at least one of " + ", ".join(MODEL_KINDS))
        unknown = [m for m in self.models if m not in MODEL_KINDS]
        if unknown:
            raise TrainError(f"--models: unknown model(s) {unknown}; choose from {', '.join(MODEL_KINDS)}")
        if len(set(self.models)) != len(self.models):
            raise TrainError(f"--models names a model twice: {list(self.models)}")
        if not self.att_dims or any(d < 1 for d in self.att_dims):
            raise TrainError(f"--att-dims must be positive integers, got {list(self.att_dims)}")
        if len(set(self.att_dims)) != len(self.att_dims):
            raise TrainError(f"--att-dims names a dim twice: {list(self.att_dims)}")
        if self.repr_dim < 1:
            raise TrainError(f"--repr-dim must be >= 1, got {self.repr_dim}")
        if self.seeds < 1:
            raise TrainError(f"--seeds must be >= 1, got {self.seeds}")

    def runs(self) -> list[tuple[str, TrainOptions]]:
        """(run name, options) for every cell of the grid, models x dims x seeds."""
        out = []
        for model in self.models:
            for dim in sorted(self.att_dims):
                repr_dim = self.repr_dim if model == "dare" else dim  # TWIN's one table shrinks as a whole
                for seed in range(self.seeds):
                    options = TrainOptions(
                        model=model, att_dim=dim, repr_dim=repr_dim, top_k=self.top_k, epochs=self.epochs,
                        batch_size=self.batch_size, lr=self.lr, seed=seed, aux_loss=self.aux_loss,
                        device=self.device, evals_per_epoch=self.evals_per_epoch,
                    )  # fmt: skip
                    out.append((f"{model}-att{dim}-repr{repr_dim}-seed{seed}", options))
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
    return metrics if metrics.get("options") == json.loads(json.dumps(asdict(options))) else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(runs: list[dict[str, object]]) -> list[dict[str, object]]:
    """One row per (model, att dim): mean and std over seeds of every table metric."""
    cells: dict[tuple[str, int], list[dict[str, object]]] = {}
    for run in runs:
        cells.setdefault((str(run["model"]), int(run["att_dim"])), []).append(run)
    order = {m: i for i, m in enumerate(MODEL_KINDS)}
    rows = []
    for (model, dim), group in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        row: dict[str, object] = {"model": model, "att_dim": dim, "repr_dim": group[0]["repr_dim"], "runs": len(group)}
        for key, _, _ in TABLE_METRICS + (("train_seconds", "", 0),):
            mean, std = _mean_std([g["metrics"].get(key) for g in group])  # type: ignore[union-attr]
            row[key] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


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
        f"- grid: models {', '.join(header['models'])}; attention dims {', '.join(map(str, header['att_dims']))}; "  # type: ignore[arg-type]
        f"DARE repr dim {header['repr_dim']} (TWIN/TWIN-proj: one table of the attention dim); "
        f"{header['seeds']} seed(s); {header['epochs']} epoch(s), batch {header['batch_size']}, top-K {header['top_k']}",
        f"- NDCG@K: the search stage's top-K against the {header['ndcg_truth']} ground truth; model-free rankings "
        f"for scale: the K most recent behaviours {_num(header['ndcg_baselines']['recency'])}, "  # type: ignore[index]
        f"K at random {_num(header['ndcg_baselines']['random'])}",  # type: ignore[index]
        f"- values: mean ± std (sample std over seeds); training wall time summed over runs "
        f"{header['total_train_seconds']:.0f} s (on a shared CPU, so the per-run seconds vary with load)",
        "",
        "| model | att dim | repr dim | runs | " + " | ".join(h for _, h, _ in TABLE_METRICS) + " | train s |",
        "|---|---:|---:|---:|" + "---:|" * (len(TABLE_METRICS) + 1),
    ]
    for row in summary:
        runs = int(row["runs"])  # type: ignore[arg-type]
        cells = [_fmt(row[key], digits, runs) for key, _, digits in TABLE_METRICS]  # type: ignore[arg-type]
        cells.append(_fmt(row["train_seconds"], 0, runs))  # type: ignore[arg-type]
        lines.append(f"| {row['model']} | {row['att_dim']} | {row['repr_dim']} | {runs} | " + " | ".join(cells) + " |")
    # The paper's layout: test AUC, models x attention dim.
    dims = sorted({int(r["att_dim"]) for r in summary})  # type: ignore[arg-type]
    lines += ["", "Test AUC by attention dim (the paper's layout):", "",
              "| model | " + " | ".join(f"dim {d}" for d in dims) + " |", "|---|" + "---:|" * len(dims)]  # fmt: skip
    for model in dict.fromkeys(str(r["model"]) for r in summary):
        by_dim = {int(r["att_dim"]): r for r in summary if r["model"] == model}  # type: ignore[arg-type]
        cells = [_fmt(by_dim[d]["test_auc"], 4, int(by_dim[d]["runs"])) if d in by_dim else "" for d in dims]  # type: ignore[arg-type]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_chart(
    summary: list[dict[str, object]],
    path: Path,
    title: str,
    ndcg_truth: str = "ground",
    baselines: dict[str, float | None] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "test_auc", "test AUC"), (axes[1], "test_ndcg_at_k", "search NDCG@K")):
        models = list(dict.fromkeys(str(r["model"]) for r in summary))
        for i, model in enumerate(models):
            rows = [r for r in summary if r["model"] == model]
            # Nudge each model sideways (on the log2 axis) so that overlapping error bars stay readable.
            nudge = 2 ** (0.05 * (i - (len(models) - 1) / 2))
            dims = [int(r["att_dim"]) * nudge for r in rows]  # type: ignore[arg-type]
            means = [r[key]["mean"] for r in rows]  # type: ignore[index]
            stds = [r[key]["std"] for r in rows]  # type: ignore[index]
            ax.errorbar(dims, means, yerr=stds, marker="o", capsize=4, label=model)
        if key == "test_ndcg_at_k":
            for (name, value), style in zip((baselines or {}).items(), (":", "--")):
                if value is not None:
                    ax.axhline(value, color="grey", linestyle=style, label=f"{name} K (no model)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(r["att_dim"]) for r in summary}))  # type: ignore[arg-type]
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("attention embedding dim (per field)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("test AUC vs attention dim (error bars: std over seeds)", fontsize=10)
    axes[1].set_title(f"search top-K vs the {ndcg_truth} truth", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class CompareResult:
    out_dir: Path
    runs: list[dict[str, object]]
    summary: list[dict[str, object]]
    markdown: str


def compare(
    data: Path | PreparedData, options: CompareOptions, out_dir: Path, *, command: str = "", progress: bool = True
) -> CompareResult:
    """Train the whole grid (reusing finished runs), then write results.json, results.md and results.png."""
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
    runs: list[dict[str, object]] = []
    bar = tqdm(plan, desc="compare", unit="run", disable=not progress, dynamic_ncols=True)
    for name, run_options in bar:
        bar.set_postfix_str(name)
        run_dir = out_dir / "runs" / name
        metrics = _reusable(run_dir, run_options, data.fingerprint)
        if metrics is None:
            metrics = train(data, run_options, run_dir, progress=progress, position=1).metrics
        runs.append({"name": name, "model": run_options.model, "att_dim": run_options.att_dim,
                     "repr_dim": run_options.resolved_repr_dim, "seed": run_options.seed, "run_dir": str(run_dir),
                     "metrics": metrics})  # fmt: skip
        _write_json(out_dir / RESULTS_JSON, header, runs, complete=False)
    bar.close()
    header["total_train_seconds"] = sum(float(r["metrics"]["train_seconds"]) for r in runs)  # type: ignore[index]
    header["ndcg_truth"] = str(runs[0]["metrics"].get("ndcg_truth", "?")).replace("_", "-")  # type: ignore[union-attr]
    header["ndcg_baselines"] = retrieval_baselines(data, data.test, options.top_k)
    summary = summarise(runs)
    markdown = render_markdown(summary, header)
    (out_dir / RESULTS_MD).write_text(markdown, encoding="utf-8")
    render_chart(summary, out_dir / RESULTS_PNG, title=str(header["data_name"]), ndcg_truth=str(header["ndcg_truth"]),
                 baselines=header["ndcg_baselines"])  # type: ignore[arg-type]  # fmt: skip
    _write_json(out_dir / RESULTS_JSON, header, runs, complete=True, summary=summary)
    return CompareResult(out_dir=out_dir, runs=runs, summary=summary, markdown=markdown)


def _write_json(path: Path, header: dict[str, object], runs: list[dict[str, object]], *, complete: bool,
                summary: list[dict[str, object]] | None = None) -> None:  # fmt: skip
    payload = {"complete": complete, **header, "summary": summary, "runs": runs}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see a half-written file
