"""`dare curve`: test AUC vs training-set size, for a few models and the model-free baselines.

When a neural model loses to a count-feature baseline on a small file, the question is whether it is the model or
the data size. This trains each row on the training samples of a fraction of the users (the same seeded draw for
every row; validation and test untouched) and fits the baselines on the same fraction, so the curves show how
each gains from more data:

    OUT/curve.json   every run's metrics and the baselines per fraction
    OUT/curve.md     mean ± std over seeds of test AUC per fraction, beside the baselines
    OUT/curve.png    test AUC vs training samples (log scale), error bars = std over seeds

Runs are normal `dare train` run folders (OUT/runs/<name>/) and are reused when their options and training rows
match, so an interrupted curve resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.baselines import evaluate_baselines
from training.compare import COMPARE_MODELS, mean_std
from training.train import PreparedData, TrainError, TrainOptions, load_prepared, subsample_train, train

# Baselines drawn beside the models (the rest are in curve.json).
DRAWN_BASELINES = ("logistic regression", "category share of history", "inverse popularity")


@dataclass(frozen=True)
class CurveOptions:
    rows: tuple[tuple[str, int, int], ...] = (("dare", 16, 16), ("twin", 16, 16))
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    seeds: int = 3
    epochs: int = 20
    patience: int = 4
    batch_size: int = 128

    def __post_init__(self) -> None:
        if not self.rows or any(label not in COMPARE_MODELS or a < 1 or r < 1 for label, a, r in self.rows):
            raise TrainError(f"--rows must be label:att:repr with a label of {', '.join(COMPARE_MODELS)}, got {list(self.rows)}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise TrainError(f"--fractions must be in (0, 1], got {list(self.fractions)}")
        if self.seeds < 1:
            raise TrainError(f"--seeds must be >= 1, got {self.seeds}")

    def options(self, label: str, att: int, rep: int, seed: int) -> TrainOptions:
        model, search = COMPARE_MODELS[label]
        return TrainOptions(model=model, search=search, att_dim=att, repr_dim=rep, seed=seed, epochs=self.epochs,
                            patience=self.patience, batch_size=self.batch_size)  # fmt: skip


def _reusable(run_dir: Path, options: TrainOptions, fingerprint: str, train_rows: int) -> dict[str, object] | None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same = (isinstance(metrics, dict) and metrics.get("data_fingerprint") == fingerprint
            and metrics.get("train_rows") == train_rows and options.same_as_recorded(metrics.get("options")))  # fmt: skip
    return metrics if same else None


def curve(data: Path | PreparedData, options: CurveOptions, out_dir: Path, *, command: str = "", progress: bool = True) -> dict[str, object]:
    """Train every (fraction, row, seed), fit the baselines per fraction; write curve.json, curve.md, curve.png."""
    full = data if isinstance(data, PreparedData) else load_prepared(Path(data))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, object]] = []
    plan = [(f, row, s) for f in sorted(options.fractions) for row in options.rows for s in range(options.seeds)]
    bar = tqdm(total=len(plan), desc="curve", unit="run", disable=not progress, dynamic_ncols=True)
    for fraction in sorted(options.fractions):
        sub = subsample_train(full, fraction)
        baselines = [b.to_dict() for b in evaluate_baselines(sub)]
        runs = []
        for label, att, rep in options.rows:
            for seed in range(options.seeds):
                name = f"frac{fraction:g}-{label}-att{att}-repr{rep}-seed{seed}"
                bar.set_postfix_str(name)
                run_options = options.options(label, att, rep, seed)
                metrics = _reusable(out_dir / "runs" / name, run_options, full.fingerprint, sub.train.rows)
                if metrics is None:
                    metrics = train(sub, run_options, out_dir / "runs" / name, progress=progress, position=1).metrics
                runs.append({"name": name, "row": f"{label} {att}/{rep}", "seed": seed,
                             "test_auc": metrics["test_auc"], "test_gauc": metrics["test_gauc"]})  # fmt: skip
                bar.update(1)
        points.append({"fraction": fraction, "train_rows": sub.train.rows, "baselines": baselines, "runs": runs})
    bar.close()
    result = {"command": command or "dare curve", "data_dir": str(full.folder), "data_fingerprint": full.fingerprint,
              "options": asdict(options), "points": points}  # fmt: skip
    (out_dir / "curve.json").write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    (out_dir / "curve.md").write_text(render_markdown(result), encoding="utf-8")
    render_chart(result, out_dir / "curve.png")
    return result


def _row_stats(point: dict[str, object]) -> dict[str, tuple[float, float, int]]:
    rows: dict[str, list[float]] = {}
    for run in point["runs"]:  # type: ignore[attr-defined]
        rows.setdefault(run["row"], []).append(run["test_auc"])
    return {row: (*mean_std(values), len(values)) for row, values in rows.items()}


def render_markdown(result: dict[str, object]) -> str:
    points = result["points"]
    rows = list(_row_stats(points[0]))  # type: ignore[index]
    lines = [f"# Test AUC vs training-set size: `{result['data_dir']}`", "",
             f"- command: `{result['command']}`",
             "- each fraction trains on the samples of that share of the training users (one seeded draw for every "
             "row); validation and test are the full splits; baselines are fit on the same fraction",
             "", "| users | training samples | " + " | ".join(rows) + " | " + " | ".join(DRAWN_BASELINES) + " |",
             "|---:|---:|" + "---:|" * (len(rows) + len(DRAWN_BASELINES))]  # fmt: skip
    for point in points:  # type: ignore[attr-defined]
        stats = _row_stats(point)
        cells = [f"{stats[r][0]:.4f} ± {stats[r][1]:.4f}" for r in rows]
        base = {b["name"]: b["test_auc"] for b in point["baselines"]}
        cells += [f"{base[name]:.4f}" for name in DRAWN_BASELINES]
        lines.append(f"| {point['fraction']:.0%} | {point['train_rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_chart(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    sizes = [p["train_rows"] for p in points]  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in _row_stats(points[0]):  # type: ignore[index]
        stats = [_row_stats(p)[row] for p in points]  # type: ignore[attr-defined]
        ax.errorbar(sizes, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=4, label=row)
    for name, style in zip(DRAWN_BASELINES, ("--", ":", "-.")):
        ax.plot(sizes, [next(b["test_auc"] for b in p["baselines"] if b["name"] == name) for p in points],  # type: ignore[attr-defined]
                color="grey", linestyle=style, marker=".", label=f"{name} (no model)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training samples (log scale)")
    ax.set_ylabel("test AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"test AUC vs training-set size ({Path(str(result['data_dir'])).name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
