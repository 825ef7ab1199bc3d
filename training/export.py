"""`dare export`: a run folder -> a model folder the service can load (see service/contract.py).

Writes model.onnx (search + score), search.onnx (the GSU), score.onnx (the ESU + head), vocab.npz and
manifest.json, then verifies itself: onnxruntime against the PyTorch model on random users, for every graph,
N in {0, 5, 200, 5000} x C in {1, 100}; the worst difference goes into manifest.parity and export fails above
1e-5.

The graphs work on ONE user with 1-D inputs, so they are shaped for serving rather than traced from the batched
training forward. What keeps them fast (numbers in docs/performance.md, section "Graph shape"):

- The search is one MatMul [C, w] x [w, N'] (ORT fuses the transpose). For DARE and TWIN the position part of
  <e_i, v_t> is <E_pos[p_i], v_tpos>, which does not depend on the candidate: it is precomputed per position
  (constant folding) and rides along as one extra column, so w = 2*d_att + 1 instead of 3*d_att and no
  [N, d] position embeddings are gathered. TWIN-proj's W_q/W_k are folded into one [3d, 3d] matrix applied to
  the C candidates (its position part does depend on the candidate, so it keeps w = 3*d + 1).
- Padding costs nothing: K..K+31 padding tokens (embedding row 0 = zeros) are prepended in-graph, and their
  extra column holds PAD_SCORE, so they score PAD_SCORE through the same MatMul, with no [C, N] mask pass.
  That also makes N = 0 and N < K ordinary cases; their indices map back to -1 with weight 0.
- Top-K in two steps, because onnxruntime's TopK costs ~1 ns per element plus ~2.5 us per row: ReduceMax over
  blocks of 32 scores (cheap, vectorised), TopK of the block maxima, then TopK over the K best blocks' 32*K
  scores. Exact: a block holding one of the K best scores has a maximum among the K largest block maxima.
- Most of a TopK's per-row cost is its heap being displaced (mispredicted branches), so for large requests
  (N >= 2048 and C >= 96) both TopKs get their heap seeded with strong values first (group maxima, moved to the
  front; `_seeded_topk`). For short histories (N + K <= 32 K, where the two-step top-K would scan all of its
  minimum K blocks anyway) one plain TopK over the N + K scores is cheaper (W1: 0.33 -> 0.26 ms at att 16).
  search.onnx and model.onnx hold the three versions behind two `If`s on N and C (`dispatch_on_size`,
  `top_k_variant`); the embedding tables are stored once.
- The score graph gathers only the K retrieved behaviours per candidate, pools each field separately (no
  [C, K, 3r] concatenation), folds the eval-mode BatchNorm into the first linear layer, and folds the constant
  target-position part of the head's input into that layer too (7r instead of 9r inputs).
"""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import dare
from dare.errors import DareError
from service.contract import (
    ATTENTION_FILE,
    GRAPH_FILES,
    GRAPH_IO,
    VOCAB_FILE,
    AttentionSpec,
    GraphSpec,
    Manifest,
    ModelFolderError,
    ParityCheck,
    VocabSpec,
    io_specs,
    load_manifest,
    sha256_file,
    write_manifest,
)
from training.model import PAD_SCORE, CTRModel, TokenEmbedding, history_positions
from training.run import load_run

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-5
PARITY_HISTORY_LENGTHS = (0, 5, 200, 5000)
PARITY_CANDIDATES = (1, 100)
TOPK_BLOCK = 32  # scores per block in the two-step top-K; 32 measured fastest of {16, 32, 64}
# The seeded top-K (see `_seeded_topk`) runs when the history and the candidate list are at least this large; below,
# its extra nodes cost more than it saves (measured crossover: N ~1,000-2,000 at C = 200; never at C = 50).
SEEDED_MIN_HISTORY = 2048
SEEDED_MIN_CANDIDATES = 96


class ExportError(DareError):
    """Export could not produce a model folder that matches the PyTorch model."""


def _history_length(hist_item: Tensor) -> Tensor:
    # A 0-d tensor (not a Python int) so the length stays symbolic when traced to ONNX (Shape -> Gather).
    return torch._shape_as_tensor(hist_item)[0]


def _frozen(tensor: Tensor) -> Tensor:
    return tensor.detach().clone().contiguous()


class UserSearchGraph(nn.Module):
    """The GSU for one user: hist [N], candidates [C] -> topk_index [C, K] (-1 = padding), topk_weight [C, K]."""

    def __init__(self, model: CTRModel, block: int | None = TOPK_BLOCK, fold_position: bool = True, seeded: bool = False) -> None:
        """`block=None` is one plain TopK over all N + K scores: the fastest for short histories, slow for long
        ones. `fold_position=False` (gather position embeddings and multiply them in the MatMul) is the slower
        shape, kept for the graph-shape benchmark. `seeded=True` seeds both TopKs of the two-step top-K with group
        maxima (see `_seeded_topk`): faster for long histories and many candidates, slower for short ones.
        search.onnx holds the three top-K versions and picks by size (`dispatch_on_size`)."""
        super().__init__()
        self.seeded = seeded and block is not None
        att: TokenEmbedding = model.tables.attention
        stage = model.search_stage
        self.top_k, self.block, self.max_position = stage.top_k, block, model.cfg.max_position
        self.scale = stage.scale
        self.register_buffer("item", _frozen(att.item.weight))  # [item_rows, d]
        self.register_buffer("cate", _frozen(att.cate.weight))  # [cate_rows, d]
        self.register_buffer("zero_rows", torch.zeros(self.top_k * (block or 1), dtype=torch.int64))  # >= pads
        # TWIN-proj's position part depends on the candidate (through W_q, W_k), so it cannot be folded.
        self.fold_position = fold_position and stage.query is None
        if self.fold_position:
            # <E_pos[p], v_tpos> / sqrt(3d) for every position p: a constant per position. Row 0 (padding) holds
            # PAD_SCORE, so padding tokens score PAD_SCORE through the MatMul itself.
            bias = (att.position.weight.detach() @ att.target_position.detach()) * self.scale  # [P+1]
        else:
            self.register_buffer("position", _frozen(att.position.weight))  # [P+1, d]
            self.register_buffer("target_position", _frozen(att.target_position))  # [d]
            bias = torch.zeros(att.position.num_embeddings)
        if stage.query is not None and stage.key is not None:
            # TWIN-proj: <W_q v, W_k e> = <v W_q^T W_k, e>; fold the two projections into one [3d, 3d] matrix.
            self.register_buffer("query_key", _frozen(stage.query.weight.t() @ stage.key.weight))
        else:
            self.query_key = None
        bias[0] = PAD_SCORE
        self.register_buffer("position_column", bias.unsqueeze(1).contiguous())  # [P+1, 1]

    def forward(self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor) -> tuple[Tensor, Tensor]:
        k = self.top_k
        n = _history_length(hist_item)
        if self.block is None:
            pads = torch.full_like(n, k)
        else:
            # Prepend padding so that the length T is a multiple of the block and holds at least K blocks
            # (n >= 0, so truncating division is floor division, and exports as one integer Div).
            b = self.block
            pads = torch.clamp(torch.div(n + k + b - 1, b, rounding_mode="trunc") * b, min=k * b) - n
        pad = self.zero_rows[:pads]
        item = torch.cat([pad, hist_item])  # [T]
        cate = torch.cat([pad, hist_cate])  # [T]
        position = torch.cat([pad, torch.clamp(n - torch.arange(n), max=self.max_position)])  # [T], 0 = padding
        cands = cand_item.shape[0]
        ones = torch.ones(cands, 1)  # [C, 1] multiplies the history's position/padding column
        if self.fold_position:
            hist = torch.cat([self.item[item], self.cate[cate], self.position_column[position]], 1)  # [T, 2d+1]
            query = torch.cat([self.item[cand_item] * self.scale, self.cate[cand_cate] * self.scale, ones], 1)  # [C, 2d+1]
        else:
            hist = torch.cat(
                [self.item[item], self.cate[cate], self.position[position], self.position_column[position]], 1
            )  # [T, 3d+1]
            target = torch.cat(
                [self.item[cand_item], self.cate[cand_cate], self.target_position.expand(cands, -1)], 1
            )  # [C, 3d]
            if self.query_key is not None:
                target = torch.matmul(target, self.query_key)
            query = torch.cat([target * self.scale, ones], 1)  # [C, 3d+1]
        scores = torch.matmul(query, hist.t())  # [C, T]
        if self.block is None:
            top_score, column = scores.topk(k, dim=1)  # [C, K]
        else:
            top_score, column = self._two_step_topk(scores, cands)
        real = column >= pads  # [C, K]
        weight = torch.exp(top_score - top_score[:, :1]) * real.to(top_score.dtype)  # [C, K]
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        index = torch.where(real, column - pads, torch.full_like(column, -1))
        return index, weight

    def _two_step_topk(self, scores: Tensor, cands: int) -> tuple[Tensor, Tensor]:
        """Exact top-K of [C, T] scores: the K blocks with the largest maxima, then the best K inside them."""
        k, b = self.top_k, self.block
        assert b is not None
        blocks = scores.reshape(cands, -1, b)  # [C, T/b, b]
        n_blocks = blocks.shape[1]
        maxima = blocks.amax(dim=2)  # [C, T/b]
        if self.seeded:
            group = torch.div(n_blocks + k - 1, k, rounding_mode="trunc")  # about K groups of block maxima
            block_max, top_block = _seeded_topk(maxima, k, group)  # [C, K]
        else:
            block_max, top_block = maxima.topk(k, dim=1, sorted=False)  # [C, K]
        flat_block = top_block + (torch.arange(cands) * n_blocks).unsqueeze(1)  # [C, K] rows of [C*T/b, b]
        picked = scores.reshape(-1, b)[flat_block]  # [C, K, b]
        if not self.seeded:
            top_score, slot = picked.reshape(cands, k * b).topk(k, dim=1)  # [C, K], sorted
            # Map only the K winners back to history columns (slot = block rank * b + offset in the block), rather
            # than building the column of all K*b picked scores first: [C, K] index arithmetic instead of [C, K*b].
            column = torch.gather(top_block, 1, torch.div(slot, b, rounding_mode="trunc")) * b + slot % b  # [C, K]
            return top_score, column
        # The K block maxima are K of the picked scores, and good ones: put them first (they fill TopK's heap) and
        # mask their own places, so each picked score is in the pool exactly once.
        at_max = picked.argmax(dim=2, keepdim=True)  # [C, K, 1], the first maximum of each block
        rest = picked.scatter(2, at_max, float("-inf")).reshape(cands, k * b)  # [C, K*b]
        top_score, slot = torch.cat([block_max, rest], 1).topk(k, dim=1)  # [C, K] of [C, K + K*b], sorted
        is_max = slot < k
        in_rest = (slot - k).clamp(min=0)  # [C, K] slot among the K*b picked scores
        rank = torch.where(is_max, slot, torch.div(in_rest, b, rounding_mode="trunc"))  # [C, K] block rank
        offset = torch.where(is_max, torch.gather(at_max.squeeze(2), 1, slot.clamp(max=k - 1)), in_rest % b)
        return top_score, torch.gather(top_block, 1, rank) * b + offset


def _seeded_topk(values: Tensor, k: int, group: Tensor) -> tuple[Tensor, Tensor]:
    """Exact top-k of [C, M] values (unsorted), with onnxruntime's TopK heap seeded by group maxima.

    onnxruntime's TopK keeps a heap of the k best seen so far and pays a few unpredictable branches every time a
    value displaces its worst (about k * ln(M / k) times per row in random order): most of its cost for a few
    hundred values per row. Scanning the maximum of each group of `group` values first fills the heap with strong
    values, so far fewer of the rest displace one. Each group's maximum is moved (not copied) to the front:
    its own place is masked with -inf, so every value is in the pool exactly once.
    """
    cands, m = values.shape[0], values.shape[1]
    pad = (group - m % group) % group
    grouped = torch.cat([values, torch.full((cands, pad), float("-inf"))], 1).reshape(cands, -1, group)  # [C, S, g]
    s = grouped.shape[1]
    seed, at = grouped.max(dim=2, keepdim=True)  # [C, S, 1] each
    rest = grouped.scatter(2, at, float("-inf")).reshape(cands, -1)  # [C, S*g]
    top, slot = torch.cat([seed.squeeze(2), rest], 1).topk(k, dim=1, sorted=False)  # [C, k] of [C, S + S*g]
    seed_slot = slot.clamp(max=s - 1)
    from_seed = torch.gather(at.squeeze(2), 1, seed_slot) + seed_slot * group  # [C, k] column of a seed
    return top, torch.where(slot < s, from_seed, (slot - s).clamp(min=0))


class UserScoreGraph(nn.Module):
    """The ESU + head for one user: hist [N], candidates [C], topk_index/topk_weight [C, K] -> prob [C]."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        rep: TokenEmbedding = model.tables.representation
        self.max_position = model.cfg.max_position
        self.register_buffer("item", _frozen(rep.item.weight))
        self.register_buffer("cate", _frozen(rep.cate.weight))
        self.register_buffer("position", _frozen(rep.position.weight))  # row 0 = padding = zeros
        self.register_buffer("pad", torch.zeros(1, dtype=torch.int64))
        value = model.representation_stage.value
        self.register_buffer("value_t", _frozen(value.weight.t()) if value is not None else torch.empty(0))
        self.has_value = value is not None
        self.dim = rep.dim
        self.mlp = _fold_target_position(_fold_batchnorm(model.head.mlp), rep.target_position.detach(), rep.dim)

    def forward(
        self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor, topk_index: Tensor, topk_weight: Tensor
    ) -> Tensor:
        n = _history_length(hist_item)
        # Slot 0 is a padding token so that index -1 (shifted to 0) reads zero embeddings, even when N = 0.
        slot = topk_index + 1  # [C, K]
        item = torch.cat([self.pad, hist_item])[slot]  # [C, K]
        cate = torch.cat([self.pad, hist_cate])[slot]  # [C, K]
        position = torch.where(topk_index >= 0, torch.clamp(n - topk_index, max=self.max_position), 0)  # [C, K]
        # Pool each field on its own ([C, 1, K] x [C, K, r] three times) and concatenate the small [C, 1, r]
        # results: concatenating the retrieved rows first would copy a [C, K, 3r] tensor (3 MB at C=200).
        weight = topk_weight.unsqueeze(1)  # [C, 1, K]
        pooled = torch.cat(
            [torch.matmul(weight, self.item[item]), torch.matmul(weight, self.cate[cate]), torch.matmul(weight, self.position[position])], 2
        ).squeeze(1)  # [C, 3r]
        if self.has_value:
            pooled = torch.matmul(pooled, self.value_t)
        r = self.dim
        # The target's position part is a constant: the MLP's first layer has it folded in (`_fold_target_position`)
        # and takes [t_ic, h_ic, t_ic * h_ic, pooled_pos] (7r wide) instead of [t, h, t * h] (9r wide).
        target = torch.cat([self.item[cand_item], self.cate[cand_cate]], 1)  # [C, 2r]: item ++ category
        h = pooled[:, : 2 * r] * target  # [C, 2r]
        logit = self.mlp(torch.cat([target, h, target * h, pooled[:, 2 * r :]], 1))  # [C, 7r] -> [C, 1]
        return torch.sigmoid(logit).squeeze(1)  # [C]


class UserFullGraph(nn.Module):
    """Search then score: hist [N], candidates [C] -> prob [C], topk_index [C, K], topk_weight [C, K]."""

    def __init__(self, model: CTRModel, block: int | None = TOPK_BLOCK, seeded: bool = False) -> None:
        super().__init__()
        self.search = UserSearchGraph(model, block=block, seeded=seeded)
        self.score = UserScoreGraph(model)

    def forward(self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        index, weight = self.search(hist_item, hist_cate, cand_item, cand_cate)
        return self.score(hist_item, hist_cate, cand_item, cand_cate, index, weight), index, weight


def _fold_batchnorm(mlp: nn.Sequential) -> nn.Sequential:
    """Eval-mode BatchNorm followed by Linear == one Linear with rescaled weights (one op less per request)."""
    norm, first, *rest = list(mlp)
    if not isinstance(norm, nn.BatchNorm1d) or not isinstance(first, nn.Linear):
        raise ExportError(f"prediction head must start with BatchNorm1d then Linear, found {type(norm).__name__}, {type(first).__name__}")
    assert norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # [F]
        shift = norm.bias - norm.running_mean * scale  # [F]
        folded = nn.Linear(first.in_features, first.out_features)
        folded.weight.copy_(first.weight * scale.unsqueeze(0))
        folded.bias.copy_(first.bias + first.weight @ shift)
    return nn.Sequential(folded, *copy.deepcopy(rest)).eval().requires_grad_(False)


def _fold_target_position(mlp: nn.Sequential, target_position: Tensor, r: int) -> nn.Sequential:
    """The head's input [t, h, t * h] (each item ++ category ++ position, r wide per field) has a constant in it:
    t's position part is the learned target-position vector v. So W [t; h; t*h] + b equals
    W' [t_ic; h_ic; t_ic * h_ic; p] + b' with p the pooled position part (h_pos = p * v, (t*h)_pos = p * v * v):
    b' = b + W_t,pos v and W'_p = W_h,pos diag(v) + W_th,pos diag(v * v). The first layer shrinks from 9r to 7r
    inputs, the same function up to float rounding."""
    first, *rest = list(mlp)
    if not isinstance(first, nn.Linear) or first.in_features != 9 * r:
        raise ExportError(f"prediction head must start with a Linear over 9 * {r} inputs, found {first}")
    with torch.no_grad():
        w = first.weight  # [H, 9r]: blocks t (item, cate, pos), h (item, cate, pos), t*h (item, cate, pos)
        block = [w[:, i * r : (i + 1) * r] for i in range(9)]  # 9 x [H, r]
        folded = nn.Linear(7 * r, first.out_features)
        folded.weight.copy_(torch.cat([*block[0:2], *block[3:5], *block[6:8], block[5] * target_position + block[8] * target_position**2], 1))
        folded.bias.copy_(first.bias + block[2] @ target_position)
    return nn.Sequential(folded, *copy.deepcopy(rest)).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- ONNX export


_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "hist_item": {0: "N"}, "hist_cate": {0: "N"}, "cand_item": {0: "C"}, "cand_cate": {0: "C"},
    "topk_index": {0: "C"}, "topk_weight": {0: "C"}, "prob": {0: "C"},
}  # fmt: skip


@contextmanager
def _quiet() -> Iterator[None]:
    """The legacy exporter warns about every traced shape computation; those are intended here."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _example_inputs(model: CTRModel, n: int, c: int, generator: torch.Generator) -> dict[str, Tensor]:
    """A random user: rows 1.. (OOV included, never padding) for n behaviours and c candidates."""
    cfg = model.cfg
    return {
        "hist_item": torch.randint(1, cfg.item_rows, (n,), generator=generator),
        "hist_cate": torch.randint(1, cfg.cate_rows, (n,), generator=generator),
        "cand_item": torch.randint(1, cfg.item_rows, (c,), generator=generator),
        "cand_cate": torch.randint(1, cfg.cate_rows, (c,), generator=generator),
    }


GRAPH_MODULES: dict[str, Callable[..., nn.Module]] = {"full": UserFullGraph, "search": UserSearchGraph, "score": UserScoreGraph}
# search.onnx and model.onnx also hold these top-K variants of their graph behind Ifs on the request size
# (`dispatch_on_size`): one plain TopK for short histories, the seeded two-step top-K for large requests.
SIZE_VARIANTS: dict[str, dict[str, Any]] = {"short": {"block": None}, "large": {"seeded": True}}


def graph_module(model: CTRModel, role: str, **variant: Any) -> nn.Module:
    """The per-user module of one graph file (`role` as in service.contract.GRAPH_IO), in eval mode."""
    model.eval()
    return GRAPH_MODULES[role](model, **variant).eval()


def top_k_variant(n: int, c: int, top_k: int) -> str:
    """Which top-K search.onnx and model.onnx run for N history events and C candidates (`dispatch_on_size`)."""
    if n + top_k <= top_k * TOPK_BLOCK:
        return "short"  # the two-step top-K would scan its minimum of K blocks, every score anyway
    if n >= SEEDED_MIN_HISTORY and c >= SEEDED_MIN_CANDIDATES:
        return "large"
    return "two-step"


def dispatch_on_size(short: Any, small: Any, large: Any, top_k: int) -> Any:
    """One ONNX model from three with the same inputs and outputs, chosen as `top_k_variant` says: `short` (one plain
    TopK) when N + K <= K * TOPK_BLOCK; else `large` (seeded top-K) when N >= SEEDED_MIN_HISTORY and
    C >= SEEDED_MIN_CANDIDATES; else `small` (the two-step top-K). Initializers the three share (the embedding
    tables) are stored once, in the outer graph, and read by every branch."""
    import onnx
    from onnx import helper, numpy_helper

    graph_inputs = {i.name for i in small.graph.input}
    inits = [{t.name: t for t in m.graph.initializer} for m in (short, small, large)]
    shared = {
        name for name in set.intersection(*(set(i) for i in inits))
        if len({i[name].SerializeToString() for i in inits}) == 1
    }  # fmt: skip
    outer: list[Any] = [inits[1][name] for name in sorted(shared)]

    def branch(model: Any, prefix: str) -> Any:
        keep = graph_inputs | shared

        def rename(name: str) -> str:
            return name if name == "" or name in keep else prefix + name

        for tensor in model.graph.initializer:
            if tensor.name not in shared:
                copy_ = onnx.TensorProto()
                copy_.CopyFrom(tensor)
                copy_.name = rename(tensor.name)
                outer.append(copy_)
        nodes = []
        for node in model.graph.node:
            copy_n = onnx.NodeProto()
            copy_n.CopyFrom(node)
            copy_n.name = prefix + node.name
            copy_n.input[:] = [rename(x) for x in node.input]
            copy_n.output[:] = [rename(x) for x in node.output]
            nodes.append(copy_n)
        outputs = []
        for value in model.graph.output:
            copy_v = onnx.ValueInfoProto()
            copy_v.CopyFrom(value)
            copy_v.name = rename(value.name)
            outputs.append(copy_v)
        return helper.make_graph(nodes, prefix.rstrip("/"), [], outputs)

    outer += [
        numpy_helper.from_array(np.array([top_k * TOPK_BLOCK - top_k + 1], dtype=np.int64), "dispatch/short_below"),
        numpy_helper.from_array(np.array([SEEDED_MIN_HISTORY], dtype=np.int64), "dispatch/min_history"),
        numpy_helper.from_array(np.array([SEEDED_MIN_CANDIDATES], dtype=np.int64), "dispatch/min_candidates"),
    ]
    outputs = [o.name for o in small.graph.output]
    # The else branch of the first If is a graph holding the second If; its outputs get their own names.
    longer = helper.make_graph(
        [helper.make_node("If", ["dispatch/large"], [f"longer/{o}" for o in outputs], name="dispatch/if_large",
                          then_branch=branch(large, "large/"), else_branch=branch(small, "small/"))],
        "longer", [], [helper.make_tensor_value_info(f"longer/{o.name}", o.type.tensor_type.elem_type, None) for o in small.graph.output],
    )  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["hist_item"], ["dispatch/n"], name="dispatch/n"),  # [1]
        helper.make_node("Shape", ["cand_item"], ["dispatch/c"], name="dispatch/c"),  # [1]
        helper.make_node("Less", ["dispatch/n", "dispatch/short_below"], ["dispatch/short"], name="dispatch/short"),
        helper.make_node("GreaterOrEqual", ["dispatch/n", "dispatch/min_history"], ["dispatch/long"], name="dispatch/long"),
        helper.make_node("GreaterOrEqual", ["dispatch/c", "dispatch/min_candidates"], ["dispatch/many"], name="dispatch/many"),
        helper.make_node("And", ["dispatch/long", "dispatch/many"], ["dispatch/large"], name="dispatch/large"),
        helper.make_node("If", ["dispatch/short"], outputs, name="dispatch/if_short",
                         then_branch=branch(short, "short/"), else_branch=longer),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, small.graph.name, list(small.graph.input), list(small.graph.output), initializer=outer)
    merged = helper.make_model(graph, opset_imports=list(small.opset_import), producer_name=small.producer_name)
    merged.ir_version = small.ir_version
    return merged


def export_graph(module: nn.Module, role: str, path: Path, model: CTRModel, opset: int) -> None:
    """Trace one per-user graph to ONNX with symbolic N and C and check it with the ONNX checker."""
    import onnx

    inputs, outputs = GRAPH_IO[role]
    generator = torch.Generator().manual_seed(0)
    # Trace on a length that is not a multiple of anything the graph uses, so no size gets baked in.
    example = _example_inputs(model, 53, 3, generator)
    if role == "score":
        with torch.no_grad():
            example["topk_index"], example["topk_weight"] = UserSearchGraph(model)(*example.values())
    args = tuple(example[name] for name in inputs)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                module, args, str(path), input_names=list(inputs), output_names=list(outputs),
                dynamic_axes={name: _DYNAMIC_AXES[name] for name in inputs + outputs},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )  # fmt: skip
        onnx.checker.check_model(str(path))
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"exporting the {role} graph at opset {opset} failed: {exc}") from None


def export_role(model: CTRModel, role: str, path: Path, opset: int) -> None:
    """One graph file as shipped: search.onnx and model.onnx hold three top-K variants behind Ifs on the request
    size (`dispatch_on_size`); score.onnx is one graph."""
    import onnx

    export_graph(graph_module(model, role), role, path, model, opset)
    if role == "score":
        return
    paths = {name: path.with_name(f".{path.stem}.{name}.onnx") for name in SIZE_VARIANTS}
    try:
        for name, variant in SIZE_VARIANTS.items():
            export_graph(graph_module(model, role, **variant), role, paths[name], model, opset)
        merged = dispatch_on_size(onnx.load(str(paths["short"])), onnx.load(str(path)), onnx.load(str(paths["large"])), model.cfg.top_k)
        onnx.save(merged, str(path))
        onnx.checker.check_model(str(path))
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"adding the size-dispatched top-K branches to the {role} graph failed: {exc}") from None
    finally:
        for extra in paths.values():
            extra.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- parity


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare_with_torch(model: CTRModel, sessions: dict[str, Any], n: int, c: int, seed: int) -> dict[str, float]:
    """Max abs difference, onnxruntime vs PyTorch, for each graph on one random user (n behaviours, c candidates).

    prob and topk_weight are compared directly. Ties (or near-ties within float rounding) can make the two
    runtimes retrieve different but equally scored behaviours, so indices are compared through their scores:
    the PyTorch scores of the behaviours onnxruntime retrieved must equal PyTorch's own top-K scores, and the
    full graph's prob is compared with PyTorch scoring onnxruntime's retrieved set.
    """
    generator = torch.Generator().manual_seed(seed)
    feed_t = _example_inputs(model, n, c, generator)
    batched = {name: t.unsqueeze(0) for name, t in feed_t.items()}  # [1, N] / [1, C]
    feed = {name: t.numpy() for name, t in feed_t.items()}
    model.eval()
    with torch.no_grad():
        index_t, weight_t = model.search(**batched)  # [1, C, K]
        att = model.tables.attention
        positions = history_positions(batched["hist_item"], model.cfg.max_position)
        all_scores = model.search_stage.scores(
            att.history(batched["hist_item"], batched["hist_cate"], positions),
            att.target(batched["cand_item"], batched["cand_cate"]),
            batched["hist_item"] != 0,
        )[0]  # [C, N]

        def retrieved_scores(index: np.ndarray) -> np.ndarray:
            idx = torch.from_numpy(index)
            if n == 0:
                return np.full(index.shape, PAD_SCORE, dtype=np.float32)
            picked = torch.gather(all_scores, 1, idx.clamp_min(0))
            return torch.where(idx >= 0, picked, torch.full_like(picked, PAD_SCORE)).numpy()

        def reference_prob(index: np.ndarray) -> np.ndarray:
            logits = model.score(**batched, topk_index=torch.from_numpy(index).unsqueeze(0), topk_weight=weight_t)
            return torch.sigmoid(logits)[0].numpy()

        torch_index, torch_weight = index_t[0].numpy(), weight_t[0].numpy()
        torch_top_scores = retrieved_scores(torch_index)
        diffs: dict[str, float] = {}
        if "search" in sessions:
            index_o, weight_o = sessions["search"].run(None, feed)
            diffs["search"] = _search_diff(index_o, weight_o, torch_index, torch_weight, torch_top_scores, retrieved_scores, n)
        if "full" in sessions:
            prob_o, index_o, weight_o = sessions["full"].run(None, feed)
            search_diff = _search_diff(index_o, weight_o, torch_index, torch_weight, torch_top_scores, retrieved_scores, n)
            diffs["full"] = max(search_diff, float(np.abs(prob_o - reference_prob(index_o)).max()))
        if "score" in sessions:
            (prob_o,) = sessions["score"].run(None, {**feed, "topk_index": torch_index, "topk_weight": torch_weight})
            diffs["score"] = float(np.abs(prob_o - reference_prob(torch_index)).max())
    return diffs


def _search_diff(index_o, weight_o, torch_index, torch_weight, torch_top_scores, retrieved_scores, n: int) -> float:  # type: ignore[no-untyped-def]
    if index_o.shape != torch_index.shape or index_o.dtype != np.int64:
        return math.inf
    if ((index_o < -1) | (index_o >= max(n, 0))).any() or ((index_o == -1) != (torch_index == -1)).any():
        return math.inf  # out of range, or padding where PyTorch found a behaviour (or the reverse)
    score_diff = np.abs(retrieved_scores(index_o) - torch_top_scores).max()
    return float(max(np.abs(weight_o - torch_weight).max(), score_diff))


def verify_parity(
    model: CTRModel,
    folder: Path,
    history_lengths: tuple[int, ...] = PARITY_HISTORY_LENGTHS,
    candidate_counts: tuple[int, ...] = PARITY_CANDIDATES,
    progress: bool = True,
) -> list[ParityCheck]:
    """Run every graph in `folder` against PyTorch on each (N, C); return the checks (not yet enforced)."""
    sessions = {role: _session(folder / GRAPH_FILES[role]) for role in GRAPH_IO}
    cases = [(n, c) for n in history_lengths for c in candidate_counts]
    checks: list[ParityCheck] = []
    for seed, (n, c) in enumerate(tqdm(cases, desc="parity onnxruntime vs torch", disable=not progress, leave=False)):
        for role, diff in compare_with_torch(model, sessions, n, c, seed).items():
            checks.append(ParityCheck(graph=role, n=n, c=c, max_abs_diff=diff))
    return checks


# ------------------------------------------------------------------------------------------------- export


# metrics.json may repeat the run's settings; the manifest keeps those in `config`, not among the metrics.
NOT_METRICS = ("config", "options")


def _numeric_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | int | None]:
    """Flatten nested metric dicts to "a.b" keys, keeping numbers (and nulls) only."""
    flat: dict[str, float | int | None] = {}
    for key, value in metrics.items():
        if not prefix and key in NOT_METRICS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numeric_metrics(value, prefix=f"{name}."))
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            flat[name] = None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
    return flat


def code_version() -> str:
    """The package version, plus the git commit when the code runs from a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{dare.__version__}+g{commit}" if commit else dare.__version__


def default_name(model: CTRModel) -> str:
    cfg = model.cfg
    return f"{cfg.kind}-att{cfg.att_dim}" if cfg.kind != "dare" or cfg.att_dim == cfg.repr_dim else f"{cfg.kind}-att{cfg.att_dim}-repr{cfg.repr_dim}"


def export_model(
    model: CTRModel,
    out_dir: Path,
    *,
    vocab_path: Path,
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    metrics: dict[str, Any] | None = None,
    data_fingerprint: str,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Write a verified model folder for `model` to `out_dir` (replacing it only once everything checks out)."""
    out_dir = Path(out_dir)
    model.eval()
    name = name or default_name(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        for role in tqdm(list(GRAPH_IO), desc="export onnx graphs", disable=not progress, leave=False):
            export_role(model, role, staging / GRAPH_FILES[role], opset)
        shutil.copyfile(vocab_path, staging / VOCAB_FILE)
        attention = write_attention_tables(model, staging / ATTENTION_FILE)
        parity = verify_parity(model, staging, progress=progress)
        worst = max(parity, key=lambda p: p.max_abs_diff)
        if not worst.max_abs_diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"onnxruntime does not match PyTorch: {worst.graph} graph at N={worst.n}, C={worst.c} differs by "
                f"{worst.max_abs_diff:g} > {PARITY_TOLERANCE:g}; nothing was written to {out_dir}"
            )
        graphs = {}
        for role in GRAPH_IO:
            inputs, outputs = io_specs(role)
            file = GRAPH_FILES[role]
            graphs[role] = GraphSpec(file=file, sha256=sha256_file(staging / file), inputs=inputs, outputs=outputs)
        cfg = model.cfg
        manifest = Manifest(
            name=name,
            version=graphs["full"].sha256[:12],  # content-addressed: the same weights give the same version
            model_kind=cfg.kind,
            att_dim=cfg.att_dim,
            repr_dim=cfg.repr_dim,
            top_k=cfg.top_k,
            max_position=cfg.max_position,
            opset=opset,
            graphs=graphs,  # type: ignore[arg-type]
            vocab=VocabSpec(sha256=sha256_file(staging / VOCAB_FILE), item_rows=cfg.item_rows, cate_rows=cfg.cate_rows),
            attention=attention,
            metrics=_numeric_metrics(metrics or {}),
            parity=parity,
            parity_tolerance=PARITY_TOLERANCE,
            data_fingerprint=data_fingerprint,
            code_version=code_version(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            config=json.loads(json.dumps(config or {"model": cfg.to_dict()})),
        )
        write_manifest(staging, manifest)
        load_manifest(staging)  # the service's own check, before the folder becomes visible
        _swap_into_place(staging, out_dir)
        return manifest
    except ModelFolderError as exc:
        raise ExportError(f"the exported folder fails the service's contract: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_attention_tables(model: CTRModel, path: Path) -> AttentionSpec | None:
    """attention.npz for the service's fused search (see service.contract.AttentionSpec): the very tables and folded
    position column search.onnx is built from. None for TWIN-proj, whose position part depends on the candidate."""
    graph = UserSearchGraph(model)
    if not graph.fold_position or graph.query_key is not None:
        return None
    with path.open("wb") as fh:
        np.savez(
            fh,
            item=graph.item.numpy().astype(np.float32),
            cate=graph.cate.numpy().astype(np.float32),
            position_column=graph.position_column.numpy().reshape(-1).astype(np.float32),
        )
    return AttentionSpec(sha256=sha256_file(path), scale=float(graph.scale))


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder into place, so a service watching `out_dir` never sees half a folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise ExportError(f"{out_dir}: exists, is not empty and is not a model folder; refusing to replace it")
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{datetime.now(UTC).strftime('%Y%m%d%H%M%S%f')}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: Path, out_dir: Path, name: str | None = None, opset: int = DEFAULT_OPSET, progress: bool = True) -> Manifest:
    """`dare export`: load the run folder, export and verify its model, write the model folder."""
    if not 13 <= opset <= 20:
        raise ExportError(f"--opset {opset} is not supported: use 13..20 (17 is the tested default)")
    run = load_run(run_dir)
    return export_model(
        run.model,
        out_dir,
        vocab_path=run.vocab_path,
        name=name,
        opset=opset,
        metrics=run.metrics,
        data_fingerprint=run.data_fingerprint,
        config=run.train_cfg.to_dict(),
        progress=progress,
    )
