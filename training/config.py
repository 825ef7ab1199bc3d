"""Typed configs that travel with the artifacts: prepared data (meta.json), runs (config.json), model folders.

The prepared-data folder written by `dare prepare` (and read by `dare train`) holds each user's event sequence once
and the samples as pointers into it (training/layout.py has the exact files, dtypes and shapes):

    sequences/     item, cate, time [E] (every kept event, grouped by user row, oldest first), offsets [U+1]
    train/, val/, test/   one row per (user, target position):
        user       [S]        user row (0..U-1): the sequence, and the group of per-user GAUC
        position   [S]        the target's index in the user's sequence; its history is the L events before it,
                              LEFT-padded with 0, oldest first, most recent last (position = L - column)
        cand_item  [S, 1+M]   column 0 the positive target, columns 1..M its sampled negatives
        cand_cate  [S, 1+M]
        label      [S, 1+M]   1 for column 0, 0 elsewhere
    vocab.npz      raw id -> row maps, arrays named by service.contract.VOCAB_ARRAYS (rows 0 = pad, 1 = OOV)
    item_cate.npy  int64 [item_rows]: the category row of each item row (for negatives and for people)
    meta.json      PrepareConfig, counts, format_version, data fingerprint, and (synthetic data) where the truth is
    truth.npz      only for synthetic data: the planted relevance table, see training/synth.py
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

ModelKind = Literal["dare", "twin", "twin-proj"]
MODEL_KINDS: tuple[ModelKind, ...] = ("dare", "twin", "twin-proj")
SearchKind = Literal["topk", "recency"]
SEARCH_KINDS: tuple[SearchKind, ...] = ("topk", "recency")
# The architecture's version, saved in config.json. 2 (2026-12): MLP input [v_t, p, v_t ⊙ p], the score's semantic
# and position parts scaled separately, TWIN-proj's four biased projections, the auxiliary head of one hidden layer.
# Version 1 (MLP input [v_t, h, v_t ⊙ h] with h = p ⊙ v_t, one 1/sqrt(3d) scale) cannot be rebuilt: retrain.
MODEL_VERSION = 2


@dataclass(frozen=True)
class PrepareConfig:
    behaviors: tuple[str, ...] = ("pv",)
    min_events: int = 20  # the paper uses 210 on the full file; 20 keeps 715 of the bundled sample's 815 users
    history_len: int = 200
    positives_per_user: int = 19  # targets at hist[-3], hist[-8], ..., every 5th
    positive_stride: int = 5
    negatives_per_positive: int = 2
    min_timestamp: int = 1511539200  # 2017-11-25 00:00 China time
    max_timestamp: int = 1512316800  # 2017-12-04 00:00 China time (exclusive)
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture; saved beside the weights (config.json) so export and eval rebuild the same model."""

    kind: ModelKind
    item_rows: int
    cate_rows: int
    att_dim: int = 16  # per field: a token is item ++ category ++ position, so 3 * att_dim wide
    repr_dim: int = 16
    top_k: int = 20
    max_position: int = 200
    mlp_hidden: tuple[int, ...] = (200, 80)
    aux_loss: bool = True  # on in every published training script of the reference
    search: SearchKind = "topk"  # "recency": the K most recent behaviours instead of the K best-scoring (ablation)
    version: int = MODEL_VERSION

    def __post_init__(self) -> None:
        if self.version != MODEL_VERSION:
            raise ValueError(f"model version {self.version} is not this code's ({MODEL_VERSION}); retrain the model")
        if self.kind != "dare" and self.att_dim != self.repr_dim:
            raise ValueError(f"model {self.kind!r} has one shared table: att_dim ({self.att_dim}) must equal repr_dim ({self.repr_dim})")
        for name in ("item_rows", "cate_rows", "att_dim", "repr_dim", "top_k", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    epochs: int = 20  # the cap; early stopping on validation AUC usually ends training first
    batch_size: int = 256
    lr: float = 0.01
    l2: float = 1e-6  # on non-embedding weights
    aux_weight: float = 1.0  # the reference adds the auxiliary loss unweighted
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
