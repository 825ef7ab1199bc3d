"""Before/after of the exported graphs: training/export.py at a git revision against the working tree.

Both versions export the same RANDOMLY INITIALISED DARE model (the `dare bench` sizes: 95,002 item rows, 1,002
category rows, repr dim 64, top-20); search.onnx and score.onnx are timed interleaved, call by call, on the same
random user, in CPU time of the calling thread (onnxruntime, 1 intra-op thread, computes on it). Probabilities and
top-K weights must agree to 1e-5 (ties may order indices differently, so indices are not compared).

    .venv/bin/python docs/bench/ab_export.py --before 4f400a3 --out docs/bench/ab_export.md
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training import export as after  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.model import build_model  # noqa: E402

WORKLOADS = (("W1", 200, 100), ("W2", 10_000, 200), ("W3", 50_000, 200))


def load_revision(rev: str, folder: Path) -> object:
    source = subprocess.run(["git", "show", f"{rev}:training/export.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = folder / "export_before.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("export_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_folder(module: object, model: torch.nn.Module, folder: Path) -> dict[str, ort.InferenceSession]:
    """search.onnx and score.onnx as that version's `export_model` writes them."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.npz"
    np.savez(vocab, item_raw=np.arange(1, 3, dtype=np.int64), item_index=np.arange(2, 4, dtype=np.int64),
             cate_raw=np.arange(1, 3, dtype=np.int64), cate_index=np.arange(2, 4, dtype=np.int64))  # fmt: skip
    out = folder / "model"
    module.export_model(model, out, vocab_path=vocab, data_fingerprint="ab", progress=False)  # type: ignore[attr-defined]
    return {role: ort.InferenceSession(str(out / f"{role}.onnx"), options, providers=["CPUExecutionProvider"]) for role in ("search", "score")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of training/export.py to compare against")
    parser.add_argument("--dims", default="16,128")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    lines = [f"# Exported graphs: `training/export.py` at {args.before} (before) vs the working tree (after)", "",
             "CPU ms per call of the calling thread, p50 over interleaved calls; 1 intra-op thread; random-init DARE, "
             "repr 64, top-20.", "", "| graph | workload | att dim | before | after | speedup |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        before = load_revision(args.before, Path(tmp))
        for dim in (int(d) for d in args.dims.split(",")):
            torch.manual_seed(dim)
            model = build_model(ModelConfig(kind="dare", item_rows=95_002, cate_rows=1_002, att_dim=dim, repr_dim=64, top_k=20)).eval()
            sessions = {name: export_folder(module, model, Path(tmp) / f"{name}-{dim}") for name, module in (("before", before), ("after", after))}
            for w, n, c in WORKLOADS:
                rng = np.random.default_rng(n + c)
                feed = {"hist_item": rng.integers(1, 95_002, n), "hist_cate": rng.integers(1, 1_002, n),
                        "cand_item": rng.integers(1, 95_002, c), "cand_cate": rng.integers(1, 1_002, c)}  # fmt: skip
                index, weight = sessions["after"]["search"].run(None, feed)
                feeds = {"search": feed, "score": {**feed, "topk_index": index, "topk_weight": weight}}
                for role in ("search", "score"):
                    answers = {name: s[role].run(None, feeds[role]) for name, s in sessions.items()}
                    if np.abs(answers["before"][-1] - answers["after"][-1]).max() > 1e-5:
                        raise SystemExit(f"{role} at {w}, att {dim}: before and after disagree")
                    cpu: dict[str, list[float]] = {"before": [], "after": []}
                    for r in range(args.repeats + 3):
                        for name in ("before", "after") if r % 2 else ("after", "before"):
                            c0 = time.thread_time()
                            sessions[name][role].run(None, feeds[role])
                            if r >= 3:
                                cpu[name].append(time.thread_time() - c0)
                    b, a = (float(np.median(cpu[k])) * 1000.0 for k in ("before", "after"))
                    lines.append(f"| {role}.onnx | {w} (N={n:,}, C={c}) | {dim} | {b:.3f} | {a:.3f} | {b / a:.2f}x |")
                    print(lines[-1], flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
