"""Graph-shape benchmark for the exported search graph (docs/performance.md, "Graph shape"). Not a test.

    python -m training.graph_bench --out var/graph-shape [--n 10000 --c 200 --dims 16 32 64 128 --threads 1]

For each attention dim it builds a randomly initialised DARE model (timings do not depend on the weights),
exports several shapes of the search graph and times them in onnxruntime, interleaved round by round so that
load from other processes hits every variant alike, next to PyTorch eager:

    traced      the batched training `CTRModel.search` traced as is (3d-wide MatMul, [C, N] mask, one TopK)
    plain       per-user graph, padding through the MatMul, position embeddings gathered, one TopK
    folded      + position part constant-folded into one extra MatMul column (2d+1 wide)
    shipped     + two-step top-K (block maxima, then TopK inside the K best blocks): what `dare export` writes
    torch       PyTorch eager `CTRModel.search` (the training model, inference mode)
    torch-user  PyTorch eager running the shipped per-user module (same algebra as `shipped`)

and the whole model: onnxruntime model.onnx vs PyTorch eager `CTRModel.forward`. Writes <out>.json (records),
<out>.md (table) and <out>.png (latency vs attention dim).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.config import ModelConfig
from training.export import UserFullGraph, UserSearchGraph, _quiet
from training.model import CTRModel, build_model

SEARCH_VARIANTS = ("traced", "plain", "folded", "shipped")


class TracedTrainingSearch(nn.Module):
    """The training model's batched search on one user ([1, N] / [1, C]), as a naive export would trace it."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor) -> tuple[Tensor, Tensor]:
        index, weight = self.model.search(hist_item[None], hist_cate[None], cand_item[None], cand_cate[None])
        return index[0], weight[0]


def _export(module: nn.Module, path: Path, outputs: list[str], n_example: int) -> None:
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(1, 50, (n_example,), generator=g), torch.randint(1, 50, (n_example,), generator=g),
            torch.randint(1, 50, (3,), generator=g), torch.randint(1, 50, (3,), generator=g))  # fmt: skip
    names = ["hist_item", "hist_cate", "cand_item", "cand_cate"]
    axes = {"hist_item": {0: "N"}, "hist_cate": {0: "N"}, "cand_item": {0: "C"}, "cand_cate": {0: "C"}}
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)  # fmt: skip


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90))}


def run(out: Path, n: int, c: int, dims: list[int], repr_dim: int, reps: int, threads: int, item_rows: int, cate_rows: int) -> list[dict]:
    import onnxruntime as ort

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rng = np.random.default_rng(0)
    feed = {"hist_item": rng.integers(2, item_rows, n), "hist_cate": rng.integers(2, cate_rows, n),
            "cand_item": rng.integers(2, item_rows, c), "cand_cate": rng.integers(2, cate_rows, c)}  # fmt: skip
    feed_t = {k: torch.from_numpy(v) for k, v in feed.items()}
    batched = [feed_t[k][None] for k in ("hist_item", "hist_cate", "cand_item", "cand_cate")]

    calls: dict[tuple[str, str, int], object] = {}  # (graph, variant, dim) -> zero-argument callable
    profiles: dict[int, list[tuple[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in tqdm(dims, desc="export variants"):
            torch.manual_seed(dim)
            model = build_model(ModelConfig(kind="dare", item_rows=item_rows, cate_rows=cate_rows, att_dim=dim, repr_dim=repr_dim)).eval()
            modules = {
                "traced": TracedTrainingSearch(model),
                "plain": UserSearchGraph(model, block=None, fold_position=False),
                "folded": UserSearchGraph(model, block=None, fold_position=True),
                "shipped": UserSearchGraph(model),
            }
            reference = None
            for variant, module in modules.items():
                path = Path(tmp) / f"{variant}-{dim}.onnx"
                _export(module.eval(), path, ["topk_index", "topk_weight"], 53)
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                _, weight = session.run(None, feed)
                reference = weight if reference is None else reference
                # Same weights from every shape (ties aside, weights do not depend on which tied index won).
                assert np.abs(weight - reference).max() <= 1e-5, f"{variant} disagrees at dim {dim}"
                calls[("search", variant, dim)] = lambda s=session: s.run(None, feed)
                if variant == "shipped" and dim in (dims[0], dims[-1]):
                    profiles[dim] = _op_profile(path, feed, threads)
            full_path = Path(tmp) / f"full-{dim}.onnx"
            _export(UserFullGraph(model).eval(), full_path, ["prob", "topk_index", "topk_weight"], 53)
            full = ort.InferenceSession(str(full_path), options, providers=["CPUExecutionProvider"])
            calls[("full", "shipped", dim)] = lambda s=full: s.run(None, feed)
            shipped_eager = modules["shipped"]

            def torch_search(m: CTRModel = model) -> object:
                with torch.inference_mode():
                    return m.search(*batched)

            def torch_user(m: nn.Module = shipped_eager) -> object:
                with torch.inference_mode():
                    return m(*feed_t.values())

            def torch_full(m: CTRModel = model) -> object:
                with torch.inference_mode():
                    return m(*batched)

            calls[("search", "torch", dim)] = torch_search
            calls[("search", "torch-user", dim)] = torch_user
            calls[("full", "torch", dim)] = torch_full

        for fn in calls.values():  # warm-up
            fn()  # type: ignore[operator]
        load_before = os.getloadavg()[0]
        samples: dict[tuple[str, str, int], list[float]] = {key: [] for key in calls}
        cpu: dict[tuple[str, str, int], list[float]] = {key: [] for key in calls}
        for _ in tqdm(range(reps), desc=f"timing N={n} C={c} threads={threads}"):
            for key, fn in calls.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn()  # type: ignore[operator]
                samples[key].append(time.perf_counter() - start)
                cpu[key].append(time.thread_time() - start_cpu)

    records = [
        {"graph": graph, "variant": variant, "backend": "torch" if variant.startswith("torch") else "onnxruntime",
         "att_dim": dim, "repr_dim": repr_dim, "n": n, "c": c, "threads": threads,
         "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], **_percentiles(values),
         # With one thread, both runtimes compute on the calling thread, so its CPU time is the work done,
         # and it is far less disturbed than wall time by other processes on a shared machine.
         **({"cpu_median_ms": float(np.median(cpu[(graph, variant, dim)]) * 1000)} if threads == 1 else {})}
        for (graph, variant, dim), values in samples.items()
    ]  # fmt: skip
    _write(out, records, dims, profiles)
    return records


def _op_profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 20) -> list[tuple[str, float]]:
    """onnxruntime's own per-node timings (SessionOptions.enable_profiling): [(op: node, mean ms)], largest first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    total: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = f"{event['args']['op_name']} {event['name'].removesuffix('_kernel_time')}"
            total[key] = total.get(key, 0.0) + event["dur"] / 1000 / runs
    return sorted(total.items(), key=lambda kv: -kv[1])


def _write(out: Path, records: list[dict], dims: list[int], profiles: dict[int, list[tuple[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    table = {(r["graph"], r["variant"], r["att_dim"]): r["median_ms"] for r in records}
    low = {(r["graph"], r["variant"], r["att_dim"]): r["p10_ms"] for r in records}
    first = records[0]
    unit = "median wall ms (10th percentile in brackets)"
    if "cpu_median_ms" in first:  # one thread: CPU time of the calling thread is the robust figure
        low = {(r["graph"], r["variant"], r["att_dim"]): r["cpu_median_ms"] for r in records}
        unit = "median wall ms (median CPU ms of the calling thread in brackets)"
    rows = [("search", v) for v in (*SEARCH_VARIANTS, "torch", "torch-user")] + [("full", "shipped"), ("full", "torch")]
    lines = [
        f"N={first['n']}, C={first['c']}, repr_dim={first['repr_dim']}, threads={first['threads']}; {unit}; "
        f"1-min load average before/after timing {first['load_avg_1min']} on {os.cpu_count()} CPUs",
        "",
        "| graph | variant | " + " | ".join(f"att {d}" for d in dims) + f" | att {dims[-1]} / att {dims[0]} |",
        "|---|---|" + "---:|" * (len(dims) + 1),
    ]
    for graph, variant in rows:
        values = [table[(graph, variant, d)] for d in dims]
        lows = [low[(graph, variant, d)] for d in dims]
        lines.append(
            f"| {graph} | {variant} | " + " | ".join(f"{v:.2f} ({w:.2f})" for v, w in zip(values, lows, strict=True))
            + f" | {values[-1] / values[0]:.2f} ({lows[-1] / lows[0]:.2f}) |"
        )
    lines.append("")
    for d in dims:
        lines.append(
            f"- att {d}: torch eager / onnxruntime = {table[('search', 'torch', d)] / table[('search', 'shipped', d)]:.2f}x "
            f"({low[('search', 'torch', d)] / low[('search', 'shipped', d)]:.2f}x) search, "
            f"{table[('full', 'torch', d)] / table[('full', 'shipped', d)]:.2f}x "
            f"({low[('full', 'torch', d)] / low[('full', 'shipped', d)]:.2f}x) full model"
        )
    for dim, ops in profiles.items():
        total = sum(ms for _, ms in ops)
        lines += ["", f"onnxruntime profile of the shipped search graph, att {dim}: {total:.2f} ms in kernels", "",
                  "| op node | ms | share |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {name} | {ms:.3f} | {100 * ms / total:.0f}% |" for name, ms in ops[:8]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    plotted, ylabel = (low, "median CPU ms of the calling thread") if "cpu_median_ms" in first else (table, "median latency (ms)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for graph, variant in rows:
        ax.plot(dims, [plotted[(graph, variant, d)] for d in dims], marker="o", label=f"{graph}: {variant}",
                linestyle="--" if variant.startswith("torch") else "-")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("attention dim (per field)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"search graph shapes, N={first['n']}, C={first['c']}, {first['threads']} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes .json, .md and .png")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--c", type=int, default=200)
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repr-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--item-rows", type=int, default=100_000)
    parser.add_argument("--cate-rows", type=int, default=5_000)
    args = parser.parse_args()
    run(args.out, args.n, args.c, args.dims, args.repr_dim, args.reps, args.threads, args.item_rows, args.cate_rows)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
