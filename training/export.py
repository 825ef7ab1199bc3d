"""`dare export`: a run folder -> a model folder the service can load (see service/contract.py).

Writes search.onnx (the GSU), score.onnx (the ESU + head), attention.npz (the attention tables for the service's
fused search kernel), vocab.npz and manifest.json, then verifies itself: onnxruntime against the PyTorch model on
random users, for both graphs, N in {0, 5, 200, 5000} x C in {1, 100}; the worst difference goes into
manifest.parity and export fails above 1e-5.

The graphs work on ONE user with 1-D inputs, so they are shaped for serving rather than traced from the batched
training forward:

- The search is one MatMul [C, w] x [w, K + N] and one TopK. For DARE and TWIN the position part of the score
  does not depend on the candidate: it is precomputed per position and rides along as one extra column, so
  w = 2*d_att + 1 and no [N, d] position embeddings are gathered. K padding tokens (embedding row 0 = zeros,
  extra column PAD_SCORE) are prepended, so N = 0 and N < K are ordinary cases.
- The score graph gathers only the K retrieved behaviours per candidate, pools each field separately (no
  [C, K, 3r] concatenation), folds the eval-mode BatchNorm into the first linear layer, and (DARE, TWIN) folds
  the constant target-position part of the head's input into that layer too (7r instead of 9r inputs).
"""

from __future__ import annotations

import copy
import hashlib
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
import torch.onnx.operators
from torch import Tensor, nn
from tqdm import tqdm

import dare_common
from dare_common import DareError
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


class ExportError(DareError):
    """Export could not produce a model folder that matches the PyTorch model."""


def _history_length(hist_item: Tensor) -> Tensor:
    # A 0-d tensor (not a Python int) so the length stays symbolic when traced to ONNX (Shape -> Gather).
    return torch.onnx.operators.shape_as_tensor(hist_item)[0]


def _frozen(tensor: Tensor) -> Tensor:
    return tensor.detach().clone().contiguous()


class UserSearchGraph(nn.Module):
    """The GSU for one user: hist [N], candidates [C] -> topk_index [C, K] (-1 = padding), topk_weight [C, K].

    One MatMul [C, w] x [w, K + N] and one TopK. For DARE and TWIN the score's position part
    <E_pos[p], v_tpos> / sqrt(d) does not depend on the candidate: it is precomputed per position and rides along
    as one extra column (w = 2d + 1), and the semantic part's 1/sqrt(2d) multiplies the candidate's rows. K padding
    tokens (embedding row 0 = zeros, extra column PAD_SCORE) are prepended, so N < K and N = 0 are ordinary cases.
    TWIN-proj's score is <(W_q t + b_q) * scale, W_k e + b_k>: the candidate side is projected through W_k^T once
    per request (w = 3d + 1); the term <(W_q t + b_q) * scale, b_k> is the same for every behaviour of a candidate,
    so it changes neither the top-K nor the softmax over it and is left out.
    """

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        att: TokenEmbedding = model.tables.attention
        stage = model.search_stage
        if stage.search != "topk":
            raise ExportError(f"a model trained with search={stage.search!r} is an evaluation ablation; only top-K search models are served")
        d = att.dim
        self.top_k, self.max_position = stage.top_k, model.cfg.max_position
        self.scale = 1.0 / math.sqrt(2 * d)  # the semantic part's scale (see training.model.score_scale)
        self.register_buffer("item", _frozen(att.item.weight))  # [item_rows, d]
        self.register_buffer("cate", _frozen(att.cate.weight))  # [cate_rows, d]
        self.register_buffer("zero_rows", torch.zeros(self.top_k, dtype=torch.int64))
        self.projected = stage.query is not None and stage.key is not None
        if self.projected:
            assert stage.query is not None and stage.key is not None
            self.register_buffer("position", _frozen(att.position.weight))  # [P+1, d]
            self.register_buffer("target_position", _frozen(att.target_position))  # [d]
            self.register_buffer("query_weight_t", _frozen(stage.query.weight.t()))  # [3d, 3d]
            self.register_buffer("query_bias", _frozen(stage.query.bias))  # [3d]
            self.register_buffer("key_weight", _frozen(stage.key.weight))  # [3d, 3d]
            self.register_buffer("score_scale", _frozen(stage.scale))  # [3d]
            column = torch.zeros(att.position.num_embeddings)
        else:
            # <E_pos[p], v_tpos> / sqrt(d) for every position p. Row 0 (padding) holds PAD_SCORE (below), so padding
            # tokens score PAD_SCORE through the MatMul itself.
            column = (att.position.weight.detach() @ att.target_position.detach()) / math.sqrt(d)  # [P+1]
        column[0] = PAD_SCORE
        self.register_buffer("position_column", column.unsqueeze(1).contiguous())  # [P+1, 1]

    def forward(self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor) -> tuple[Tensor, Tensor]:
        k = self.top_k
        n = _history_length(hist_item)
        item = torch.cat([self.zero_rows, hist_item])  # [K+N]
        cate = torch.cat([self.zero_rows, hist_cate])  # [K+N]
        position = torch.cat([self.zero_rows, torch.clamp(n - torch.arange(n), max=self.max_position)])  # [K+N], 0 = pad
        cands = cand_item.shape[0]
        ones = torch.ones(cands, 1)  # [C, 1] multiplies the history's position/padding column
        if self.projected:
            hist = torch.cat([self.item[item], self.cate[cate], self.position[position], self.position_column[position]], 1)  # [K+N, 3d+1]
            target = torch.cat([self.item[cand_item], self.cate[cand_cate], self.target_position.expand(cands, -1)], 1)  # [C, 3d]
            query = (torch.matmul(target, self.query_weight_t) + self.query_bias) * self.score_scale  # [C, 3d]
            query = torch.cat([torch.matmul(query, self.key_weight), ones], 1)  # [C, 3d+1]
        else:
            hist = torch.cat([self.item[item], self.cate[cate], self.position_column[position]], 1)  # [K+N, 2d+1]
            query = torch.cat([self.item[cand_item] * self.scale, self.cate[cand_cate] * self.scale, ones], 1)  # [C, 2d+1]
        scores = torch.matmul(query, hist.t())  # [C, K+N]
        top_score, column = scores.topk(k, dim=1)  # [C, K], sorted
        real = column >= k  # [C, K]
        weight = torch.exp(top_score - top_score[:, :1]) * real.to(top_score.dtype)  # [C, K]
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        index = torch.where(real, column - k, torch.full_like(column, -1))
        return index, weight


class UserScoreGraph(nn.Module):
    """The ESU + head for one user: hist [N], candidates [C], topk_index/topk_weight [C, K] -> prob [C]."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        rep: TokenEmbedding = model.tables.representation
        stage = model.representation_stage
        self.max_position = model.cfg.max_position
        self.register_buffer("item", _frozen(rep.item.weight))
        self.register_buffer("cate", _frozen(rep.cate.weight))
        self.register_buffer("position", _frozen(rep.position.weight))  # row 0 = padding = zeros
        self.register_buffer("target_position", _frozen(rep.target_position))
        self.register_buffer("pad", torch.zeros(1, dtype=torch.int64))
        self.dim = rep.dim
        self.projected = stage.value is not None and stage.target is not None
        mlp = _fold_batchnorm(model.head.mlp)
        if self.projected:
            assert stage.value is not None and stage.target is not None
            self.register_buffer("value_t", _frozen(stage.value.weight.t()))
            self.register_buffer("value_bias", _frozen(stage.value.bias))
            self.register_buffer("target_t", _frozen(stage.target.weight.t()))
            self.register_buffer("target_bias", _frozen(stage.target.bias))
            self.mlp = mlp
        else:
            self.mlp = _fold_target_position(mlp, rep.target_position.detach(), rep.dim)

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
        target = torch.cat([self.item[cand_item], self.cate[cand_cate]], 1)  # [C, 2r]: item ++ category
        if self.projected:
            # p = sum_i w_i (W_v e_i + b_v) = W_v (sum_i w_i e_i) + b_v * sum_i w_i (0 for an empty history).
            pooled = torch.matmul(pooled, self.value_t) + self.value_bias * topk_weight.sum(1, keepdim=True)  # [C, 3r]
            full_target = torch.cat([target, self.target_position.expand(target.shape[0], -1)], 1)  # [C, 3r]
            v = torch.matmul(full_target, self.target_t) + self.target_bias  # [C, 3r]
            logit = self.mlp(torch.cat([v, pooled, v * pooled], 1))  # [C, 9r] -> [C, 1]
            return torch.sigmoid(logit).squeeze(1)
        r = self.dim
        # The target's position part is a constant: the MLP's first layer has it folded in (`_fold_target_position`)
        # and takes [v_ic, p_ic, v_ic * p_ic, p_pos] (7r wide) instead of [v, p, v * p] (9r wide).
        p_ic = pooled[:, : 2 * r]
        logit = self.mlp(torch.cat([target, p_ic, target * p_ic, pooled[:, 2 * r :]], 1))  # [C, 7r] -> [C, 1]
        return torch.sigmoid(logit).squeeze(1)  # [C]


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
    """The head's input [v, p, v * p] (each item ++ category ++ position, r wide per field) has a constant in it:
    v's position part is the learned target-position vector t. So W [v; p; v*p] + b equals
    W' [v_ic; p_ic; v_ic * p_ic; p_pos] + b' with b' = b + W_v,pos t and W'_p,pos = W_p,pos + W_vp,pos diag(t).
    The first layer shrinks from 9r to 7r inputs, the same function up to float rounding."""
    first, *rest = list(mlp)
    if not isinstance(first, nn.Linear) or first.in_features != 9 * r:
        raise ExportError(f"prediction head must start with a Linear over 9 * {r} inputs, found {first}")
    with torch.no_grad():
        w = first.weight  # [H, 9r]: blocks v (item, cate, pos), p (item, cate, pos), v*p (item, cate, pos)
        block = [w[:, i * r : (i + 1) * r] for i in range(9)]  # 9 x [H, r]
        folded = nn.Linear(7 * r, first.out_features)
        folded.weight.copy_(torch.cat([*block[0:2], *block[3:5], *block[6:8], block[5] + block[8] * target_position], 1))
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


GRAPH_MODULES: dict[str, Callable[[CTRModel], nn.Module]] = {"search": UserSearchGraph, "score": UserScoreGraph}


def graph_module(model: CTRModel, role: str) -> nn.Module:
    """The per-user module of one graph file (`role` as in service.contract.GRAPH_IO), in eval mode."""
    model.eval()
    return GRAPH_MODULES[role](model).eval()


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
    return f"{dare_common.__version__}+g{commit}" if commit else dare_common.__version__


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
            export_graph(graph_module(model, role), role, staging / GRAPH_FILES[role], model, opset)
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
            version=hashlib.sha256((graphs["search"].sha256 + graphs["score"].sha256).encode()).hexdigest()[:12],  # content-addressed
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
    if graph.projected:
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
