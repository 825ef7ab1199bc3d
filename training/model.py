"""DARE, TWIN and TWIN-proj in PyTorch: a two-stage long-sequence CTR model that returns logits.

Stages, named by role (TorchRec style):

    EmbeddingTables      the attention and representation token tables (DARE: two; TWIN: one shared)
    SearchStage          the GSU: score every history token against the target (semantic and position parts
                         scaled separately), keep the top-K, softmax over the K retrieved (padding masked)
    RepresentationStage  the ESU: p = sum_i w_i * e_repr_i over the retrieved tokens
    PredictionHead       BatchNorm on [v_t, p, v_t ⊙ p], MLP 200 -> 80 -> 1 with PReLU

Every remaining difference from the authors' code (github thuml/DARE) is listed with its reason in docs/model.md.

A token is item ++ category ++ position embeddings (each `att_dim` or `repr_dim` wide). The target has no
position of its own, yet the dot product with a history token needs one, so each table carries a learned
"target position" vector that stands in for the target's position part (it lets the model learn a per-position
bias <e_pos, v_tpos> in the search, which is what recency weighting needs).

Batch conventions (training): int64 row indices; `hist_item`/`hist_cate` [B, L] are LEFT-padded with 0, oldest
first, most recent in the last column, so the position of column j is L - j (clipped to `max_position`, 0 for
padding); `cand_item`/`cand_cate` [B, C] share the user's history (C = 1 + negatives in training; serving runs
B = 1 with C up to 1,000 and L up to 100,000). Histories shorter than K, and empty ones (L = 0 or all padding),
work: missing slots have index -1 and weight 0, so a new user gets p = 0.

The loss and optimiser live in the training loop; `forward` returns logits only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dare_common import DareError
from training.config import ModelConfig

# Score given to padding tokens. Finite (not -inf) so that a softmax over an all-padding top-K stays NaN-free;
# real scores are dot products of N(0, 0.01)-initialised embeddings and never come near it.
PAD_SCORE = -1e9
EMBEDDING_INIT_STD = 0.01


class ModelInputError(DareError):
    """Tensors handed to the model do not have the documented shapes."""


class TokenEmbedding(nn.Module):
    """One token table: item, category and position embeddings plus the learned target-position vector."""

    def __init__(self, item_rows: int, cate_rows: int, max_position: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # padding_idx=0 keeps row 0 at zero and gives it no gradient, so padding contributes nothing.
        self.item = nn.Embedding(item_rows, dim, padding_idx=0)
        self.cate = nn.Embedding(cate_rows, dim, padding_idx=0)
        self.position = nn.Embedding(max_position + 1, dim, padding_idx=0)  # row p = position p; row 0 = padding
        self.target_position = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (self.item, self.cate, self.position):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()
        nn.init.normal_(self.target_position, std=EMBEDDING_INIT_STD)

    @property
    def width(self) -> int:
        return 3 * self.dim

    def history(self, item: Tensor, cate: Tensor, position: Tensor) -> Tensor:
        """[...] rows -> [..., 3d] tokens (item ++ category ++ position)."""
        return torch.cat([self.item(item), self.cate(cate), self.position(position)], dim=-1)

    def target(self, item: Tensor, cate: Tensor) -> Tensor:
        """[...] rows -> [..., 3d] target tokens (item ++ category ++ learned target position)."""
        item_emb = self.item(item)  # [..., d]
        return torch.cat([item_emb, self.cate(cate), self.target_position.expand_as(item_emb)], dim=-1)


class EmbeddingTables(nn.Module):
    """DARE: separately initialised attention and representation tables. TWIN/TWIN-proj: one table for both."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.decoupled = cfg.kind == "dare"
        self.attention = TokenEmbedding(cfg.item_rows, cfg.cate_rows, cfg.max_position, cfg.att_dim)
        # For TWIN the representation *is* the attention table; it is registered once so the state_dict
        # and the optimiser see it once.
        self._representation = (
            TokenEmbedding(cfg.item_rows, cfg.cate_rows, cfg.max_position, cfg.repr_dim) if self.decoupled else None
        )

    @property
    def representation(self) -> TokenEmbedding:
        return self._representation if self._representation is not None else self.attention


def history_positions(hist_item: Tensor, max_position: int) -> Tensor:
    """[B, L] left-padded rows -> [B, L] positions: L - column (most recent = 1), clipped, 0 for padding."""
    length = hist_item.shape[-1]
    position = torch.arange(length, 0, -1, device=hist_item.device, dtype=torch.int64)  # [L]: L, L-1, ..., 1
    position = position.clamp(max=max_position).expand_as(hist_item)  # [B, L]
    return torch.where(hist_item != 0, position, torch.zeros_like(position))


def masked_softmax(scores: Tensor, valid: Tensor, dim: int = -1) -> Tensor:
    """Softmax over `dim` that gives invalid entries weight 0 and an all-invalid slice all zeros (not NaN)."""
    if scores.shape[dim] == 0:  # an empty history: nothing to weigh
        return torch.zeros_like(scores)
    scores = torch.where(valid, scores, torch.full_like(scores, PAD_SCORE))
    shifted = scores - scores.amax(dim=dim, keepdim=True)
    weights = torch.exp(shifted) * valid.to(scores.dtype)
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def score_scale(dim: int, device: torch.device | None = None) -> Tensor:
    """[3d] per-coordinate score scale: 1/sqrt(2d) on the semantic part (item ++ category), 1/sqrt(d) on the position.

    The reference (`attention_pytorch.py`, scaled_dot_product with use_time_mode concat) scales the two dot
    products separately and adds them; multiplying the target token by this vector does the same in one product.
    """
    semantic = torch.full((2 * dim,), 1.0 / math.sqrt(2 * dim), device=device)
    position = torch.full((dim,), 1.0 / math.sqrt(dim), device=device)
    return torch.cat([semantic, position])


class SearchStage(nn.Module):
    """The GSU: score every history token against the target, keep K, softmax over the K.

    score_i = <sem_i, sem_t> / sqrt(2d) + <pos_i, pos_t> / sqrt(d) on the attention table. With `projections`
    (TWIN-proj) the target token goes through W_q and the history tokens through W_k first (both with bias, after
    the concatenation, as the reference's `projection` model with `mlp_position_after_concat`). With
    `search="recency"` the K kept are the K most recent behaviours, not the K best-scoring ones (the reference's
    "hard" search, an ablation that measures what the search itself buys); the weights are still the softmax of
    their scores.
    """

    def __init__(self, top_k: int, dim: int, projections: bool, search: str = "topk") -> None:
        super().__init__()
        self.top_k = top_k
        self.search = search
        self.register_buffer("scale", score_scale(dim), persistent=False)  # [3d]
        self.query = nn.Linear(3 * dim, 3 * dim) if projections else None
        self.key = nn.Linear(3 * dim, 3 * dim) if projections else None

    def scores(self, hist_tokens: Tensor, target_tokens: Tensor, valid: Tensor) -> Tensor:
        """[B, L, 3d] history, [B, C, 3d] targets, [B, L] valid -> [B, C, L] scores, padding at PAD_SCORE."""
        if self.query is not None and self.key is not None:
            target_tokens = self.query(target_tokens)
            hist_tokens = self.key(hist_tokens)
        scores = torch.matmul(target_tokens * self.scale, hist_tokens.transpose(1, 2))  # [B, C, L]
        return torch.where(valid.unsqueeze(1), scores, torch.full_like(scores, PAD_SCORE))

    def forward(self, hist_tokens: Tensor, target_tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """-> topk_index [B, C, K] (history column, -1 = padding), topk_weight [B, C, K] (padding weight 0)."""
        index, weight, _ = self.search_with_scores(hist_tokens, target_tokens, valid)
        return index, weight

    def search_with_scores(self, hist_tokens: Tensor, target_tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`forward`, plus the scores of every history column [B, C, L] (padding at PAD_SCORE)."""
        batch, length = valid.shape
        if length < self.top_k:
            # Left-pad to K so that top-K always has K slots; the pad columns are mapped back to -1 below.
            extra = self.top_k - length
            hist_tokens = nn.functional.pad(hist_tokens, (0, 0, extra, 0))  # [B, K, 3d]
            valid = nn.functional.pad(valid, (extra, 0), value=False)  # [B, K]
        else:
            extra = 0
        scores = self.scores(hist_tokens, target_tokens, valid)  # [B, C, L']
        if self.search == "recency":
            # The K most recent valid columns (left padding: the later the column, the more recent).
            column = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)  # [L']
            recency = torch.where(valid, column, torch.full_like(column, -1.0)).unsqueeze(1).expand_as(scores)
            top_column = recency.topk(self.top_k, dim=-1).indices  # [B, C, K]
            top_score = torch.gather(scores, 2, top_column)
        else:
            top_score, top_column = scores.topk(self.top_k, dim=-1)  # [B, C, K]
        top_valid = torch.gather(valid.unsqueeze(1).expand_as(scores), 2, top_column)  # [B, C, K]
        weight = masked_softmax(top_score, top_valid)  # [B, C, K]
        index = torch.where(top_valid, top_column - extra, torch.full_like(top_column, -1))
        return index, weight, scores[..., extra:]


class RepresentationStage(nn.Module):
    """The ESU: p = sum_i w_i * e_repr_i over the retrieved tokens, and the target's representation v_t.

    TWIN-proj applies W_v (with bias) to every history token and W_t (with bias) to the target token, as the
    reference's `projection` model does on the representation side. Padding slots have weight 0, so an empty
    history gives p = 0 (the bias of W_v is weighted by sum_i w_i, which is 0 there and 1 otherwise).
    """

    def __init__(self, width: int, projections: bool) -> None:
        super().__init__()
        self.value = nn.Linear(width, width) if projections else None
        self.target = nn.Linear(width, width) if projections else None

    def pool(self, tokens: Tensor, weight: Tensor) -> Tensor:
        """[B, C, K, 3r] retrieved (or [B, 1, L, 3r] all) tokens, [B, C, K] weights -> p [B, C, 3r]."""
        if self.value is not None:
            tokens = self.value(tokens)
        return torch.matmul(weight.unsqueeze(-2), tokens).squeeze(-2)  # [B, C, 3r]

    def target_token(self, target_tokens: Tensor) -> Tensor:
        """[B, C, 3r] -> v_t [B, C, 3r]."""
        return self.target(target_tokens) if self.target is not None else target_tokens


class PredictionHead(nn.Module):
    """BatchNorm on [v_t, p, v_t ⊙ p] (the reference with use_cross_feature), MLP with PReLU -> 1 logit."""

    def __init__(self, width: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(3 * width)]
        previous = 3 * width
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.PReLU(size)]
            previous = size
        layers.append(nn.Linear(previous, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, target: Tensor, pooled: Tensor) -> Tensor:
        """[B, C, 3r] v_t, [B, C, 3r] p -> logits [B, C]."""
        features = torch.cat([target, pooled, target * pooled], dim=-1)  # [B, C, 9r]
        batch, cands, width = features.shape
        return self.mlp(features.reshape(batch * cands, width)).reshape(batch, cands)


# The reference's auxiliary MLP is one hidden layer of 200 (its main MLP has 200 -> 80).
AUX_HIDDEN = (200,)


class CTRModel(nn.Module):
    """DARE / TWIN / TWIN-proj. `forward` -> logits [B, C]; `search` is the GSU alone; `score` the ESU + head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        projections = cfg.kind == "twin-proj"
        self.tables = EmbeddingTables(cfg)
        self.search_stage = SearchStage(cfg.top_k, self.tables.attention.dim, projections, cfg.search)
        self.representation_stage = RepresentationStage(self.tables.representation.width, projections)
        self.head = PredictionHead(self.tables.representation.width, cfg.mlp_hidden)
        # The auxiliary head (cfg.aux_loss) sees a softmax over ALL history positions; it has its own MLP.
        self.aux_head = PredictionHead(self.tables.representation.width, AUX_HIDDEN) if cfg.aux_loss else None

    def _check(self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor) -> None:
        if hist_item.dim() != 2 or hist_item.shape != hist_cate.shape:
            raise ModelInputError(f"hist_item/hist_cate must both be [B, L], got {tuple(hist_item.shape)} and {tuple(hist_cate.shape)}")
        if cand_item.dim() != 2 or cand_item.shape != cand_cate.shape or cand_item.shape[0] != hist_item.shape[0]:
            raise ModelInputError(f"cand_item/cand_cate must both be [B, C] with the history's B, got {tuple(cand_item.shape)} and {tuple(cand_cate.shape)}")

    def search(self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor) -> tuple[Tensor, Tensor]:
        """The GSU on the attention table only -> (topk_index [B, C, K], topk_weight [B, C, K])."""
        self._check(hist_item, hist_cate, cand_item, cand_cate)
        att = self.tables.attention
        positions = history_positions(hist_item, self.cfg.max_position)  # [B, L]
        hist_tokens = att.history(hist_item, hist_cate, positions)  # [B, L, 3a]
        target_tokens = att.target(cand_item, cand_cate)  # [B, C, 3a]
        return self.search_stage(hist_tokens, target_tokens, hist_item != 0)

    def score(
        self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor, topk_index: Tensor, topk_weight: Tensor
    ) -> Tensor:
        """The ESU + head on the representation table only, given the search output -> logits [B, C]."""
        rep = self.tables.representation
        batch, cands, k = topk_index.shape
        length = hist_item.shape[1]
        # Gather only the K retrieved behaviours per candidate; padding slots (-1) read row 0 = zero embedding.
        safe = topk_index.clamp_min(0).reshape(batch, cands * k)  # [B, C*K]
        is_real = (topk_index >= 0).reshape(batch, cands * k)
        if length == 0:
            item_rows = cate_rows = torch.zeros_like(safe)
        else:
            item_rows = torch.where(is_real, torch.gather(hist_item, 1, safe), 0)  # [B, C*K]
            cate_rows = torch.where(is_real, torch.gather(hist_cate, 1, safe), 0)
        position = torch.where(is_real & (item_rows != 0), (length - safe).clamp(max=self.cfg.max_position), 0)
        retrieved = rep.history(item_rows, cate_rows, position).reshape(batch, cands, k, rep.width)  # [B, C, K, 3r]
        pooled = self.representation_stage.pool(retrieved, topk_weight)  # [B, C, 3r]
        target = self.representation_stage.target_token(rep.target(cand_item, cand_cate))  # [B, C, 3r]
        return self.head(target, pooled)

    def forward(
        self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor, *, with_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """[B, L] history, [B, C] candidates -> logits [B, C]; with_aux=True: `forward_with_aux` (training goes
        through `forward` either way, so DistributedDataParallel sees the call)."""
        if with_aux:
            return self.forward_with_aux(hist_item, hist_cate, cand_item, cand_cate)
        topk_index, topk_weight = self.search(hist_item, hist_cate, cand_item, cand_cate)
        return self.score(hist_item, hist_cate, cand_item, cand_cate, topk_index, topk_weight)

    def forward_with_aux(
        self, hist_item: Tensor, hist_cate: Tensor, cand_item: Tensor, cand_cate: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> (logits [B, C], aux_logits [B, C]); the auxiliary head pools over ALL history positions with a
        softmax of the attention scores, which sends the attention table gradient beyond the top-K."""
        if self.aux_head is None:
            raise ModelInputError("forward_with_aux needs a model built with ModelConfig(aux_loss=True)")
        self._check(hist_item, hist_cate, cand_item, cand_cate)
        att, rep = self.tables.attention, self.tables.representation
        positions = history_positions(hist_item, self.cfg.max_position)  # [B, L]
        valid = hist_item != 0  # [B, L]
        index, top_weight, scores = self.search_stage.search_with_scores(
            att.history(hist_item, hist_cate, positions), att.target(cand_item, cand_cate), valid
        )  # [B, C, K] x 2, [B, C, L]
        logits = self.score(hist_item, hist_cate, cand_item, cand_cate, index, top_weight)
        weight = masked_softmax(scores, valid.unsqueeze(1).expand_as(scores))  # [B, C, L]
        hist_repr = rep.history(hist_item, hist_cate, positions).unsqueeze(1)  # [B, 1, L, 3r]
        pooled = self.representation_stage.pool(hist_repr, weight)  # [B, C, 3r]
        target = self.representation_stage.target_token(rep.target(cand_item, cand_cate))  # [B, C, 3r]
        return logits, self.aux_head(target, pooled)


def build_model(cfg: ModelConfig) -> CTRModel:
    """The model for `cfg.kind` ("dare", "twin" or "twin-proj"), randomly initialised (embeddings N(0, 0.01))."""
    if cfg.kind not in ("dare", "twin", "twin-proj"):
        raise DareError(f"unknown model kind {cfg.kind!r}; expected dare, twin or twin-proj")
    if cfg.search not in ("topk", "recency"):
        raise DareError(f"unknown search {cfg.search!r}; expected topk or recency")
    return CTRModel(cfg)


def parameter_groups(model: CTRModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(embedding parameters: no L2, dense parameters: L2 1e-6 in the reference recipe)."""
    embedding_ids = {id(p) for p in model.tables.parameters()}
    embedding = [p for p in model.parameters() if id(p) in embedding_ids]
    dense = [p for p in model.parameters() if id(p) not in embedding_ids]
    return embedding, dense
