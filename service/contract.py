"""The contract between `training` (which writes model folders) and `service` (which serves them).

A model folder holds:

    manifest.json   this module's `Manifest`, the only description the service trusts
    search.onnx     the attention path alone (the GSU): history + candidates -> topk_index, topk_weight
    score.onnx      the representation path alone (the ESU + MLP): history + candidates + search output -> prob
    attention.npz   optional: the attention tables as plain arrays for the fused search kernel (`AttentionSpec`)
    vocab.npz       raw id -> embedding row maps (see `VOCAB_ARRAYS`); loaded with allow_pickle=False

The service owns this module; `training.export` imports it to write manifests, so neither side can drift.
The service never imports torch or `training`.

Graph conventions (every graph works on ONE user):
- inputs are embedding-row indices (already mapped from raw ids via vocab.npz), int64, 1-D:
  `hist_item`/`hist_cate` have length N >= 0 in chronological order (oldest first, most recent last);
  `cand_item`/`cand_cate` have length C >= 1.
- positions are computed inside the graph: the most recent behaviour has position 1, clipped to `max_position`.
- `topk_index` is int64 [C, K], positions 0..N-1 in the history; -1 marks padding (history shorter than K),
  which always has weight 0. `topk_weight` is float32 [C, K], the softmax over the retrieved K (padding masked).
- `prob` is float32 [C], the click probability (sigmoid of the logit) in candidate order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dare_common import DareError

# 2 (2026-12): the model follows the authors' code (MLP input [v_t, p, v_t ⊙ p], the score's semantic and position
# parts scaled separately), and the never-served model.onnx is gone. Version 1 folders are refused: re-export.
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.npz"
PAD_INDEX = 0
OOV_INDEX = 1
# vocab.npz arrays: `<field>_raw` is the sorted raw ids (`dare prepare` writes item_raw as uint64, cate_raw as int64;
# the service takes int64 or uint64 for both), `<field>_index` the row for each (int64, >= 2).
VOCAB_ARRAYS = ("item_raw", "item_index", "cate_raw", "cate_index")

GraphRole = Literal["search", "score"]
GRAPH_FILES: dict[str, str] = {"search": "search.onnx", "score": "score.onnx"}

# Names and dtypes of every graph's inputs and outputs; the exporter must produce exactly these.
HISTORY_INPUTS = ("hist_item", "hist_cate")
CANDIDATE_INPUTS = ("cand_item", "cand_cate")
SEARCH_OUTPUTS = ("topk_index", "topk_weight")
PROB_OUTPUT = "prob"
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "search": (HISTORY_INPUTS + CANDIDATE_INPUTS, SEARCH_OUTPUTS),
    "score": (HISTORY_INPUTS + CANDIDATE_INPUTS + SEARCH_OUTPUTS, (PROB_OUTPUT,)),
}
TENSOR_DTYPES: dict[str, str] = {
    "hist_item": "int64",
    "hist_cate": "int64",
    "cand_item": "int64",
    "cand_cate": "int64",
    "topk_index": "int64",
    "topk_weight": "float32",
    "prob": "float32",
}

ModelKind = Literal["dare", "twin", "twin-proj"]


class ModelFolderError(DareError):
    """A model folder is missing a file, has a malformed manifest, or does not match its manifest."""


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: Literal["int64", "float32"]
    shape: list[str | int]


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class VocabSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = VOCAB_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    item_rows: int = Field(ge=2, description="rows of the item tables, padding and OOV included")
    cate_rows: int = Field(ge=2, description="rows of the category tables, padding and OOV included")
    pad_index: Literal[0] = PAD_INDEX
    oov_index: Literal[1] = OOV_INDEX


ATTENTION_FILE = "attention.npz"


class AttentionSpec(BaseModel):
    """The attention tables as plain arrays, for the service's fused search kernel (service/search.py): the same
    numbers search.onnx holds as initializers. attention.npz: `item` float32 [item_rows, att_dim], `cate` float32
    [cate_rows, att_dim], `position_column` float32 [max_position + 1] (row p: the position part of every score,
    <E_pos[p], v_tpos> / sqrt(att_dim); row 0, padding, PAD_SCORE). Score of history event t for candidate c:
    <scale * item[c], item[t]> + <scale * cate[c], cate[t]> + position_column[min(N - t, max_position)].
    Optional: a folder without it (or a model kind whose position part depends on the candidate, TWIN-proj) is
    searched with search.onnx."""

    model_config = ConfigDict(extra="forbid")
    file: str = ATTENTION_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: float = Field(gt=0, description="1 / sqrt(2 * att_dim): multiplies the candidate's item and category rows")


class ParityCheck(BaseModel):
    """One export self-check: onnxruntime vs PyTorch on a random history of length n and c candidates."""

    model_config = ConfigDict(extra="forbid")
    graph: str
    n: int
    c: int
    max_abs_diff: float


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    model_kind: ModelKind
    att_dim: int = Field(ge=1, description="per-field attention embedding dim (item, category, position)")
    repr_dim: int = Field(ge=1, description="per-field representation embedding dim")
    top_k: int = Field(ge=1)
    max_position: int = Field(ge=1, description="positions beyond this are clipped to it")
    opset: int = Field(ge=13)
    graphs: dict[GraphRole, GraphSpec]
    vocab: VocabSpec
    attention: AttentionSpec | None = None
    metrics: dict[str, float | int | None] = Field(default_factory=dict)
    parity: list[ParityCheck] = Field(default_factory=list)
    parity_tolerance: float = 1e-5
    data_fingerprint: str
    code_version: str
    created_at: str
    config: dict[str, object] = Field(default_factory=dict, description="the full training config, for people")

    @model_validator(mode="after")
    def _check_graphs(self) -> Manifest:
        missing = [role for role in GRAPH_IO if role not in self.graphs]
        if missing:
            raise ValueError(f"graphs is missing {missing}")
        for role, (inputs, outputs) in GRAPH_IO.items():
            spec = self.graphs[role]
            got_in = tuple(t.name for t in spec.inputs)
            got_out = tuple(t.name for t in spec.outputs)
            if got_in != inputs or got_out != outputs:
                raise ValueError(
                    f"graph {role!r} must have inputs {inputs} and outputs {outputs}, has {got_in} and {got_out}"
                )
            for t in spec.inputs + spec.outputs:
                if t.dtype != TENSOR_DTYPES[t.name]:
                    raise ValueError(f"graph {role!r} tensor {t.name!r} must be {TENSOR_DTYPES[t.name]}, is {t.dtype}")
        worst = max((p.max_abs_diff for p in self.parity), default=0.0)
        if worst > self.parity_tolerance:
            raise ValueError(f"export parity check failed: max abs diff {worst:g} > tolerance {self.parity_tolerance:g}")
        return self


def io_specs(role: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The TensorSpecs a graph of this role must declare (shapes symbolic: N, C, K)."""
    shapes = {
        "hist_item": ["N"], "hist_cate": ["N"], "cand_item": ["C"], "cand_cate": ["C"],
        "topk_index": ["C", "K"], "topk_weight": ["C", "K"], "prob": ["C"],
    }  # fmt: skip
    inputs, outputs = GRAPH_IO[role]
    return (
        [TensorSpec(name=n, dtype=TENSOR_DTYPES[n], shape=shapes[n]) for n in inputs],  # type: ignore[arg-type]
        [TensorSpec(name=n, dtype=TENSOR_DTYPES[n], shape=shapes[n]) for n in outputs],  # type: ignore[arg-type]
    )


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_manifest(folder: Path, *, verify_hashes: bool = True) -> Manifest:
    """Read and validate `folder/manifest.json` and the files it names; raise ModelFolderError saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: not a directory")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no {MANIFEST_FILE} (is this a folder written by `dare export`?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelFolderError(f"{path}: must hold a JSON object")
    if raw.get("schema_version") == 1:
        raise ModelFolderError(
            f"{path}: schema_version 1 is a model exported before 2026-12, whose MLP input and attention scaling "
            f"differ from the authors' model; this service reads schema_version {SCHEMA_VERSION}: retrain "
            "(`dare train`) and re-export (`dare export`) it"
        )
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ModelFolderError(
            f"{path}: schema_version {raw.get('schema_version')!r} is not supported (this service reads {SCHEMA_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ModelFolderError(f"{path}: invalid manifest: {problems}") from None
    files = [(g.file, g.sha256) for g in manifest.graphs.values()] + [(manifest.vocab.file, manifest.vocab.sha256)]
    if manifest.attention is not None:
        files.append((manifest.attention.file, manifest.attention.sha256))
    for name, expected in files:
        file = folder / name
        if Path(name).name != name:
            raise ModelFolderError(f"{path}: file name {name!r} must be a plain name inside the folder")
        if not file.is_file():
            raise ModelFolderError(f"{folder}: manifest names {name}, which is missing")
        if verify_hashes and sha256_file(file) != expected:
            raise ModelFolderError(f"{folder}: {name} does not match the sha256 in the manifest (changed or corrupt)")
    return manifest


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path
