"""Round 3's search-graph alternatives that were measured and not kept (docs/performance.md, "Tried in round 3"),
and the one that was kept (one plain TopK for short histories: where it pays, and that it gives the same answers).

1. `lean`: search.onnx written node by node (onnx.helper, ~65 nodes instead of the traced graph's ~120). Both TopKs
   are seeded with K copies of a constant just below a proven lower bound of the K-th value (the minimum of K group
   maxima, then of the K best block maxima), so no ArgMax + ScatterElements is needed to keep each score in the
   pool once. Exact: the same retrieved set and weights as the shipped graph on every case checked below.
2. `chunks`: the search MatMul + block ReduceMax with the candidates split into chunks (so each [c, T] block of
   scores could stay in L2), against one MatMul.
3. `transposed`: scores computed as [T, w] x [w, C] instead of [C, w] x [w, T].

Randomly initialised DARE models at the `dare bench` sizes (95,002 item rows, 1,002 category rows, top-20), one
intra-op thread, variants interleaved call by call; p50 wall ms.

    .venv/bin/python docs/bench/tried_round3.py --out docs/bench/tried_round3.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.config import ModelConfig  # noqa: E402
from training.export import UserSearchGraph, export_graph, export_role  # noqa: E402
from training.model import build_model  # noqa: E402

ITEM_ROWS, CATE_ROWS, TOP_K, BLOCK = 95_002, 1_002, 20, 32
CASES = ((0, 3), (5, 7), (200, 100), (3_000, 1), (10_000, 200))  # (N, C) checked for identical answers


class Builder:
    """A tiny onnx.helper wrapper: nodes named after their first output, constants added on first use."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}

    def const(self, name: str, value: object, dtype: type = np.int64) -> str:
        if name not in self.inits:
            self.inits[name] = nh.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def op(self, kind: str, inputs: list[str], *outputs: str, **attrs: object) -> str:
        self.nodes.append(oh.make_node(kind, inputs, list(outputs), name=outputs[0], **attrs))
        return outputs[0]

    def below(self, x: str, name: str) -> str:
        """A value strictly below x in float32 for every finite x: x - (|x| * 2^-20 + 1e-30)."""
        scaled = self.op("Mul", [self.op("Abs", [x], name + "_abs"), self.const("rel", 2.0**-20, np.float32)], name + "_rel")
        return self.op("Sub", [x, self.op("Add", [scaled, self.const("tiny_abs", 1e-30, np.float32)], name + "_eps")], name)

    def seeded_topk(self, values: str, floor: str, name: str, sorted_: int) -> tuple[str, str]:
        """TopK of [K seeds just below `floor` (<= the K-th largest of `values`), values]; slots index `values`."""
        seeds = self.op("Expand", [self.below(floor, name + "_seed"), self.const("k_cols", [1, TOP_K])], name + "_seeds")
        pool = self.op("Concat", [seeds, values], name + "_pool", axis=1)
        self.op("TopK", [pool, self.const("k", [TOP_K])], name + "_values", name + "_slots", axis=1, sorted=sorted_)
        slot = self.op("Max", [self.op("Sub", [name + "_slots", "k"], name + "_shift"), self.const("zero", [0])], name + "_slot")
        return name + "_values", slot


def lean_search(graph: UserSearchGraph) -> onnx.ModelProto:
    """The DARE/TWIN search (folded position column) as a hand-built graph with the same inputs and outputs."""
    k, b = TOP_K, BLOCK
    g = Builder()
    g.inits.update({name: nh.from_array(t.numpy(), name) for name, t in (("item", graph.item), ("cate", graph.cate),
                                                                          ("position_column", graph.position_column))})  # fmt: skip
    # T: a multiple of K*b holding the history and at least K padding tokens; pads = T - N.
    n = g.op("Shape", ["hist_item"], "n")
    blocks_needed = g.op("Div", [g.op("Add", [n, g.const("kb_plus", [k * b + k - 1])], "n_plus"), g.const("kb", [k * b])], "t_groups")
    pads = g.op("Sub", [g.op("Mul", [blocks_needed, "kb"], "t"), n], "pads")
    pad = g.op("Slice", [g.const("zeros", np.zeros(2 * k * b, np.int64)), "zero", pads], "pad")
    item_idx = g.op("Concat", [pad, "hist_item"], "item_idx", axis=0)
    cate_idx = g.op("Concat", [pad, "hist_cate"], "cate_idx", axis=0)
    positions = g.op("Range", [g.op("Squeeze", [n], "n_scalar"), g.const("zero_s", 0), g.const("minus_one_s", -1)], "positions")
    pos_idx = g.op("Concat", [pad, g.op("Min", [positions, g.const("max_position", [graph.max_position])], "clipped")], "pos_idx", axis=0)
    hist = g.op("Concat", [g.op("Gather", ["item", item_idx], "hist_item_rows"), g.op("Gather", ["cate", cate_idx], "hist_cate_rows"),
                           g.op("Gather", ["position_column", pos_idx], "hist_position")], "hist", axis=1)  # fmt: skip
    query = g.op("Concat", [g.op("Gather", ["item", "cand_item"], "cand_item_rows"), g.op("Gather", ["cate", "cand_cate"], "cand_cate_rows")],
                 "query_raw", axis=1)  # fmt: skip
    query = g.op("Mul", [query, g.const("scale", graph.scale, np.float32)], "query_scaled")
    query = g.op("Pad", [query, g.const("one_column", [0, 0, 0, 1]), g.const("one", 1.0, np.float32)], "query", mode="constant")
    scores = g.op("MatMul", [query, g.op("Transpose", [hist], "hist_t", perm=[1, 0])], "scores")  # [C, T]
    blocks = g.op("Reshape", [scores, g.const("block_shape", [0, -1, b])], "blocks")  # [C, B, b]
    maxima = g.op("ReduceMax", [blocks], "block_max", axes=[2], keepdims=0)  # [C, B]
    groups = g.op("ReduceMax", [g.op("Reshape", [maxima, g.const("group_shape", [0, k, -1])], "grouped")], "group_max", axes=[2], keepdims=0)
    top_block_max, top_block = g.seeded_topk(maxima, g.op("ReduceMin", [groups], "group_floor", axes=[1], keepdims=1), "top_blocks", 0)
    picked = g.op("GatherND", [blocks, g.op("Unsqueeze", [top_block, g.const("last_axis", [-1])], "top_blocks_nd")], "picked", batch_dims=1)
    picked = g.op("Reshape", [picked, g.const("flat", [0, -1])], "picked_flat")  # [C, K*b]
    top, slot = g.seeded_topk(picked, g.op("ReduceMin", [top_block_max], "block_floor", axes=[1], keepdims=1), "top", 1)
    block = g.op("GatherElements", [top_block, g.op("Div", [slot, g.const("b", [b])], "rank")], "block", axis=1)
    column = g.op("Add", [g.op("Mul", [block, "b"], "block_start"), g.op("Mod", [slot, "b"], "offset")], "column")
    index = g.op("Sub", [column, pads], "index")
    real = g.op("GreaterOrEqual", [index, "zero"], "real")
    g.op("Where", [real, index, g.const("minus_one", [-1])], "topk_index")
    shifted = g.op("Sub", [top, g.op("ReduceMax", [top], "top_max", axes=[1], keepdims=1)], "shifted")
    weights = g.op("Where", [real, g.op("Exp", [shifted], "exp"), g.const("zero_f", 0.0, np.float32)], "weights_raw")
    total = g.op("ReduceSum", [weights, g.const("axis1", [1])], "weights_sum", keepdims=1)
    g.op("Div", [weights, g.op("Max", [total, g.const("f32_tiny", np.finfo(np.float32).tiny, np.float32)], "norm")], "topk_weight")
    inputs = [oh.make_tensor_value_info(x, TensorProto.INT64, [d]) for x, d in (("hist_item", "N"), ("hist_cate", "N"), ("cand_item", "C"), ("cand_cate", "C"))]
    outputs = [oh.make_tensor_value_info("topk_index", TensorProto.INT64, ["C", k]), oh.make_tensor_value_info("topk_weight", TensorProto.FLOAT, ["C", k])]
    model = oh.make_model(oh.make_graph(g.nodes, "search", inputs, outputs, list(g.inits.values())), opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def scores_graph(c: int, t: int, w: int, chunks: int, transposed: bool) -> onnx.ModelProto:
    """MatMul + block ReduceMax of [C, w] queries against [T, w] history rows: whole, in chunks, or transposed."""
    g = Builder()
    if transposed:
        g.op("MatMul", ["H", g.op("Transpose", ["Q"], "q_t", perm=[1, 0])], "s")  # [T, C]
        g.op("ReduceMax", [g.op("Reshape", ["s", g.const("shape", [-1, BLOCK, c])], "r")], "M", axes=[1], keepdims=0)
    else:
        parts = [f"q{i}" for i in range(chunks)]
        if chunks > 1:
            g.op("Split", ["Q"], *parts, axis=0)
        h_t = g.op("Transpose", ["H"], "h_t", perm=[1, 0])
        maxima = []
        for i, q in enumerate(parts if chunks > 1 else ["Q"]):
            s = g.op("MatMul", [q, h_t], f"s{i}")
            maxima.append(g.op("ReduceMax", [g.op("Reshape", [s, g.const("shape", [0, -1, BLOCK])], f"r{i}")], f"m{i}", axes=[2], keepdims=0))
        g.op("Concat", maxima, "M", axis=0) if chunks > 1 else g.op("Identity", maxima, "M")
    inputs = [oh.make_tensor_value_info("Q", TensorProto.FLOAT, [c, w]), oh.make_tensor_value_info("H", TensorProto.FLOAT, [t, w])]
    return oh.make_model(oh.make_graph(g.nodes, "scores", inputs, [oh.make_tensor_value_info("M", TensorProto.FLOAT, None)],
                                       list(g.inits.values())), opset_imports=[oh.make_opsetid("", 17)])  # fmt: skip


def _seeded_branch_nodes(graph: onnx.GraphProto) -> int:
    """Nodes (Constants aside) of the shipped graph's seeded top-K branch, the If branch named `large`."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.name == "large":
                return sum(n.op_type != "Constant" for n in attribute.g.node)
            if attribute.g.node:
                found = _seeded_branch_nodes(attribute.g)
                if found:
                    return found
    return 0


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(repeats + 5):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            if r >= 5:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) * 1000.0 for name, v in times.items()}


def random_user(n: int, c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"hist_item": rng.integers(1, ITEM_ROWS, n), "hist_cate": rng.integers(1, CATE_ROWS, n),
            "cand_item": rng.integers(1, ITEM_ROWS, c), "cand_cate": rng.integers(1, CATE_ROWS, c)}  # fmt: skip


def short_history_section(repeats: int) -> list[str]:
    """Kept in round 3: one plain TopK against the two-step top-K by history length (where the crossover is), and
    the two giving the same retrieved weights on tie-heavy histories (3 distinct items) around the switch."""
    lines = ["", "## Kept: one plain TopK vs the two-step top-K by history length (C=100, p50 wall ms)", "",
             "| N | att 16 one TopK | att 16 two-step | att 128 one TopK | att 128 two-step |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    sessions: dict[int, dict[str, ort.InferenceSession]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in (16, 128):
            torch.manual_seed(dim)
            model = build_model(ModelConfig(kind="dare", item_rows=ITEM_ROWS, cate_rows=CATE_ROWS, att_dim=dim, repr_dim=64, top_k=TOP_K)).eval()
            paths = {name: Path(tmp) / f"{name}{dim}.onnx" for name in ("one TopK", "two-step")}
            export_graph(UserSearchGraph(model, block=None).eval(), "search", paths["one TopK"], model, 17)
            export_graph(UserSearchGraph(model).eval(), "search", paths["two-step"], model, 17)
            sessions[dim] = {name: session(path) for name, path in paths.items()}
    rng = np.random.default_rng(1)
    for n in (3, 19, 20, 21, 300, 599, 620, 621, 700):  # tie-heavy: 3 distinct items, 2 categories
        for c in (1, 50):
            feeds = {"hist_item": rng.choice([5, 6, 7], n), "hist_cate": rng.choice([3, 4], n),
                     "cand_item": rng.integers(1, ITEM_ROWS, c), "cand_cate": rng.integers(1, CATE_ROWS, c)}  # fmt: skip
            a, b = (sessions[16][name].run(None, feeds) for name in ("one TopK", "two-step"))
            same = np.abs(np.sort(a[1], 1) - np.sort(b[1], 1)).max() <= 1e-6 and np.array_equal((a[0] >= 0).sum(1), (b[0] >= 0).sum(1))
            if not same:
                raise SystemExit(f"one TopK and the two-step top-K differ on a tie-heavy history, N={n}, C={c}")
    for n in (20, 100, 200, 400, 600, 1_000, 2_000):
        feeds = random_user(n, 100, seed=n)
        ms = {dim: interleaved(sessions[dim], feeds, repeats) for dim in (16, 128)}
        lines.append(f"| {n:,} | {ms[16]['one TopK']:.3f} | {ms[16]['two-step']:.3f} | {ms[128]['one TopK']:.3f} | {ms[128]['two-step']:.3f} |")
    lines += ["", "Same retrieved weights on tie-heavy histories (3 distinct items) at N = 3..700, C = 1 and 50: checked."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    lines = ["# Round 3: alternatives measured and not kept (`docs/bench/tried_round3.py`)", "",
             "p50 wall ms, one intra-op thread, variants interleaved call by call; random-init DARE, top-20.", "",
             "## Hand-built search graph vs the shipped search.onnx", "",
             "| att dim | workload | shipped (traced; Ifs on the size: W1 one TopK, W2 seeded two-step) | lean (hand-built) | nodes: shipped seeded branch / lean |",
             "|---:|---|---:|---:|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for dim in (16, 128):
            torch.manual_seed(dim)
            model = build_model(ModelConfig(kind="dare", item_rows=ITEM_ROWS, cate_rows=CATE_ROWS, att_dim=dim, repr_dim=64, top_k=TOP_K)).eval()
            shipped_path = Path(tmp) / f"search{dim}.onnx"
            export_role(model, "search", shipped_path, 17)  # as export_model writes it
            lean = lean_search(UserSearchGraph(model))
            sessions = {"shipped": session(shipped_path), "lean": session(lean)}
            for n, c in CASES:  # same retrieved set and weights
                a, b = (sessions[name].run(None, random_user(n, c, seed=n + c)) for name in ("shipped", "lean"))
                if not (np.array_equal(np.sort(a[0], 1), np.sort(b[0], 1)) and np.abs(np.sort(a[1], 1) - np.sort(b[1], 1)).max() <= 1e-6):
                    raise SystemExit(f"lean graph differs from the shipped one at att {dim}, N={n}, C={c}")
            shipped_nodes = _seeded_branch_nodes(onnx.load(str(shipped_path)).graph)
            for workload, n, c in (("W1 (N=200, C=100)", 200, 100), ("W2 (N=10,000, C=200)", 10_000, 200)):
                ms = interleaved(sessions, random_user(n, c, seed=1), args.repeats)
                lines.append(f"| {dim} | {workload} | {ms['shipped']:.3f} | {ms['lean']:.3f} | {shipped_nodes} / {len(lean.graph.node)} |")
    lines += ["", "## Scores + block maxima: whole, in candidate chunks, transposed (W2 shape: C=200, T=10,048)", "",
              "| width w (att dim) | whole | 2 chunks | 4 chunks | 8 chunks | 20 chunks | transposed |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    c, t = 200, 10_048
    rng = np.random.default_rng(0)
    for w, dim in ((33, 16), (257, 128)):
        feeds = {"Q": rng.random((c, w), dtype=np.float32), "H": rng.random((t, w), dtype=np.float32)}
        sessions = {"whole": session(scores_graph(c, t, w, 1, False))}
        sessions.update({f"{k} chunks": session(scores_graph(c, t, w, k, False)) for k in (2, 4, 8, 20)})
        sessions["transposed"] = session(scores_graph(c, t, w, 1, True))
        ms = interleaved(sessions, feeds, args.repeats)
        lines.append(f"| {w} ({dim}) | " + " | ".join(f"{ms[name]:.3f}" for name in sessions) + " |")
    lines += short_history_section(args.repeats)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
