"""DARE / TWIN / TWIN-proj in PyTorch: shapes, gradient routing (the point of DARE), edge cases, eval mode."""

from __future__ import annotations

import pytest
import torch

from dare_common import DareError
from tests.conftest import randomize_for_tests
from training.config import ModelConfig
from training.model import CTRModel, ModelInputError, build_model, history_positions, parameter_groups

ITEMS, CATES, K = 60, 12, 5


def make(kind: str, att_dim: int = 8, repr_dim: int = 8, aux: bool = False, randomize: bool = True) -> CTRModel:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(kind=kind, item_rows=ITEMS, cate_rows=CATES, att_dim=att_dim, repr_dim=repr_dim, top_k=K,  # type: ignore[arg-type]
                    max_position=50, aux_loss=aux)
    )  # fmt: skip
    if randomize:
        randomize_for_tests(model)
    return model


def batch(b: int, length: int, c: int, pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Histories [b, length] left-padded with `pad` zero columns, candidates [b, c]; rows >= 1."""
    g = torch.Generator().manual_seed(seed)
    hist_item = torch.randint(1, ITEMS, (b, length), generator=g)
    hist_cate = torch.randint(1, CATES, (b, length), generator=g)
    hist_item[:, :pad] = 0
    hist_cate[:, :pad] = 0
    return hist_item, hist_cate, torch.randint(1, ITEMS, (b, c), generator=g), torch.randint(1, CATES, (b, c), generator=g)


def grads(output: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(output, params, retain_graph=True, allow_unused=True))


def is_zero(g: torch.Tensor | None) -> bool:
    return g is None or bool((g == 0).all())


def table_params(model: CTRModel, which: str) -> list[torch.nn.Parameter]:
    return list(getattr(model.tables, which).parameters())


@pytest.mark.parametrize("kind", ["dare", "twin", "twin-proj"])
@pytest.mark.parametrize("length,pad", [(30, 4), (3, 0), (0, 0), (8, 8)])
def test_forward_and_search_shapes(kind: str, length: int, pad: int) -> None:
    model = make(kind, att_dim=4 if kind == "dare" else 8).eval()
    hist_item, hist_cate, cand_item, cand_cate = batch(3, length, 4, pad)
    logits = model(hist_item, hist_cate, cand_item, cand_cate)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    index, weight = model.search(hist_item, hist_cate, cand_item, cand_cate)
    assert index.shape == weight.shape == (3, 4, K)
    real_tokens = length - pad
    expected_slots = min(K, real_tokens)
    assert ((index >= 0).sum(-1) == expected_slots).all()
    assert (weight[index < 0] == 0).all()
    sums = weight.sum(-1)
    torch.testing.assert_close(sums, torch.full_like(sums, 1.0 if expected_slots else 0.0))
    if expected_slots:  # retrieved columns are real behaviours, each at most once per candidate
        got = index[index >= 0]
        assert (got >= pad).all() and (got < length).all()
        assert all(len(set(row[row >= 0].tolist())) == expected_slots for row in index.reshape(-1, K))


def test_search_retrieves_the_highest_scores() -> None:
    model = make("dare").eval()
    hist_item, hist_cate, cand_item, cand_cate = batch(2, 40, 3, pad=5)
    att = model.tables.attention
    positions = history_positions(hist_item, model.cfg.max_position)
    with torch.no_grad():
        scores = model.search_stage.scores(att.history(hist_item, hist_cate, positions), att.target(cand_item, cand_cate), hist_item != 0)
        index, weight = model.search(hist_item, hist_cate, cand_item, cand_cate)
    top = scores.topk(K, dim=-1).values  # [B, C, K]
    torch.testing.assert_close(torch.gather(scores, 2, index), top)
    torch.testing.assert_close(weight, torch.softmax(top, dim=-1))


def test_dare_attention_and_representation_paths_are_decoupled() -> None:
    """The attention table gets gradient ONLY through the weights; the representation table ONLY through the
    representation path; and neither path reaches the other's table."""
    model = make("dare", att_dim=4, repr_dim=8).eval()
    data = batch(3, 20, 3, pad=2)
    att, rep = table_params(model, "attention"), table_params(model, "representation")
    assert not {id(p) for p in att} & {id(p) for p in rep}

    index, weight = model.search(*data)
    probe = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    search_out = (weight * probe).sum()
    assert all(is_zero(g) for g in grads(search_out, rep)), "search sent gradient to the representation table"
    assert not all(is_zero(g) for g in grads(search_out, att))

    weight_leaf = weight.detach().requires_grad_(True)
    repr_out = model.score(*data, index, weight_leaf).sum()
    assert all(is_zero(g) for g in grads(repr_out, att)), "representation path sent gradient to the attention table"
    repr_grads = grads(repr_out, rep)
    assert not all(is_zero(g) for g in repr_grads)

    # The full model's gradient splits exactly into the two paths.
    (d_weight,) = torch.autograd.grad(repr_out, weight_leaf, retain_graph=True)
    full = model(*data).sum()
    for got, want in zip(grads(full, att), grads((weight * d_weight).sum(), att), strict=True):
        torch.testing.assert_close(got if got is not None else torch.zeros(()), want if want is not None else torch.zeros(()))
    for got, want in zip(grads(full, rep), repr_grads, strict=True):
        torch.testing.assert_close(got if got is not None else torch.zeros(()), want if want is not None else torch.zeros(()))


def test_twin_shared_table_gets_both_gradients() -> None:
    model = make("twin").eval()
    assert model.tables.representation is model.tables.attention
    data = batch(3, 20, 3)
    table = table_params(model, "attention")
    index, weight = model.search(*data)
    probe = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    assert not is_zero(grads((weight * probe).sum(), table)[0])  # item table, via attention
    assert not is_zero(grads(model.score(*data, index, weight.detach()).sum(), table)[0])  # via representation


def test_twin_proj_projections_get_gradient() -> None:
    model = make("twin-proj").eval()
    projections = [model.search_stage.query, model.search_stage.key, model.representation_stage.value]
    assert all(p is not None for p in projections)
    out = model(*batch(3, 20, 3)).sum()
    for layer, g in zip(projections, grads(out, [p.weight for p in projections]), strict=True):  # type: ignore[union-attr]
        assert not is_zero(g), f"{layer} got no gradient"


def test_aux_loss_reaches_attention_rows_beyond_top_k() -> None:
    model = make("dare", aux=True).eval()
    hist_item = torch.arange(2, 32).unsqueeze(0)  # 30 distinct items, so each table row is one behaviour
    hist_cate = torch.full_like(hist_item, 3)
    cand_item, cand_cate = torch.tensor([[40, 41]]), torch.tensor([[4, 5]])
    logits, aux = model.forward_with_aux(hist_item, hist_cate, cand_item, cand_cate)
    assert logits.shape == aux.shape == (1, 2)
    item_table = model.tables.attention.item.weight
    (main_grad,) = torch.autograd.grad(logits.sum(), item_table, retain_graph=True)
    (aux_grad,) = torch.autograd.grad(aux.sum(), item_table)
    touched_main = int((main_grad[2:32].abs().sum(1) > 0).sum())
    assert touched_main <= 2 * K  # only retrieved behaviours (at most K per candidate)
    assert int((aux_grad[2:32].abs().sum(1) > 0).sum()) == 30  # every history behaviour
    with pytest.raises(ModelInputError, match="aux_loss=True"):
        make("dare").forward_with_aux(hist_item, hist_cate, cand_item, cand_cate)


def test_empty_history_is_a_cold_start() -> None:
    """No behaviours: h = 0, so the logit is the head applied to the target alone; padding adds nothing."""
    model = make("dare").eval()
    _, _, cand_item, cand_cate = batch(2, 0, 3)
    empty = torch.zeros(2, 0, dtype=torch.int64)
    with torch.no_grad():
        rep = model.tables.representation
        target = rep.target(cand_item, cand_cate)
        expected = model.head(target, torch.zeros_like(target))
        torch.testing.assert_close(model(empty, empty, cand_item, cand_cate), expected)
        all_pad = torch.zeros(2, 9, dtype=torch.int64)
        torch.testing.assert_close(model(all_pad, all_pad, cand_item, cand_cate), expected)


def test_left_padding_does_not_change_scores() -> None:
    model = make("dare").eval()
    hist_item, hist_cate, cand_item, cand_cate = batch(2, 12, 3)
    padded_item = torch.cat([torch.zeros(2, 7, dtype=torch.int64), hist_item], 1)
    padded_cate = torch.cat([torch.zeros(2, 7, dtype=torch.int64), hist_cate], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded_item, padded_cate, cand_item, cand_cate), model(hist_item, hist_cate, cand_item, cand_cate))


def test_positions_past_the_trained_range_are_clipped() -> None:
    model = make("dare").eval()  # max_position 50
    hist_item, hist_cate, cand_item, cand_cate = batch(1, 600, 4)
    positions = history_positions(hist_item, 50)
    assert positions.max() == 50 and positions[0, -1] == 1 and positions[0, 549] == 51 - 0 - 1
    # Every behaviour older than 50 sits at position 50, so their order among themselves cannot matter.
    perm = torch.randperm(550, generator=torch.Generator().manual_seed(3))
    shuffled_item, shuffled_cate = hist_item.clone(), hist_cate.clone()
    shuffled_item[0, :550], shuffled_cate[0, :550] = hist_item[0, perm], hist_cate[0, perm]
    with torch.no_grad():
        torch.testing.assert_close(model(shuffled_item, shuffled_cate, cand_item, cand_cate), model(hist_item, hist_cate, cand_item, cand_cate))
        # ...while reordering recent behaviours does change the scores (positions are used at all).
        short_item, short_cate = hist_item[:, -K + 1 :], hist_cate[:, -K + 1 :]  # fewer than K: all retrieved
        reversed_scores = model(short_item.flip(1), short_cate.flip(1), cand_item, cand_cate)
        assert not torch.allclose(reversed_scores, model(short_item, short_cate, cand_item, cand_cate))


def test_eval_mode_is_deterministic_and_batch_independent() -> None:
    """Eval mode uses BatchNorm's running statistics (the reference code's flaw: it never calls eval())."""
    model = make("dare").eval()
    data = batch(4, 25, 3)
    with torch.no_grad():
        first, second = model(*data), model(*data)
        alone = model(*(t[:1] for t in data))
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[:1])
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(*(t[:2] for t in data))[:1], alone)  # train mode: batch statistics


def test_padding_rows_stay_zero_and_init_is_small() -> None:
    model = make("dare", randomize=False)
    for table in (model.tables.attention, model.tables.representation):
        for emb in (table.item, table.cate, table.position):
            assert (emb.weight[0] == 0).all()
            assert 0.005 < float(emb.weight[1:].detach().std()) < 0.02  # N(0, 0.01)
    # twin-proj requires one shared dim; DARE may decouple them
    assert model.tables.attention.dim == 8 and make("dare", att_dim=4, repr_dim=16).tables.representation.dim == 16


def test_parameter_groups_split_embeddings_from_dense() -> None:
    for kind in ("dare", "twin", "twin-proj"):
        model = make(kind)
        embedding, dense = parameter_groups(model)
        all_ids = [id(p) for p in model.parameters()]
        assert sorted(map(id, embedding + dense)) == sorted(all_ids) and len(all_ids) == len(set(all_ids))
        assert {id(p) for p in embedding} == {id(p) for p in model.tables.parameters()}
        assert all(not isinstance(m, torch.nn.Embedding) for m in model.modules() if any(id(p) in map(id, dense) for p in m.parameters(recurse=False)))
    twin_embedding, _ = parameter_groups(make("twin"))
    dare_embedding, _ = parameter_groups(make("dare"))
    assert len(dare_embedding) == 2 * len(twin_embedding)  # two tables vs one shared


def test_bad_inputs_raise_dare_errors() -> None:
    model = make("dare").eval()
    hist_item, hist_cate, cand_item, cand_cate = batch(2, 5, 3)
    with pytest.raises(ModelInputError, match="hist_item/hist_cate"):
        model(hist_item, hist_cate[:, :4], cand_item, cand_cate)
    with pytest.raises(ModelInputError, match="cand_item/cand_cate"):
        model(hist_item, hist_cate, cand_item[:1], cand_cate[:1])
    with pytest.raises(DareError, match="unknown model kind"):
        build_model(ModelConfig(kind="din", item_rows=9, cate_rows=9))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- fidelity to the authors' code
# Each test below fails on the model before the 2026-12 fidelity fix (docs/model.md lists what changed).


def _tiny_dare() -> CTRModel:
    """DARE with d = 2, K = 2, hand-set embeddings (so every number below can be checked by hand)."""
    model = build_model(ModelConfig(kind="dare", item_rows=5, cate_rows=3, att_dim=2, repr_dim=2, top_k=2, max_position=4,
                                    mlp_hidden=(3,), aux_loss=False))  # fmt: skip
    with torch.no_grad():
        att, rep = model.tables.attention, model.tables.representation
        att.item.weight.copy_(torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0]], dtype=torch.float32))
        att.cate.weight.copy_(torch.tensor([[0, 0], [1, 0], [0, 2]], dtype=torch.float32))
        att.position.weight.copy_(torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float32))
        att.target_position.copy_(torch.tensor([2.0, 0.0]))
        rep.item.weight.copy_(torch.arange(10, dtype=torch.float32).reshape(5, 2) / 10)
        rep.cate.weight.copy_(torch.tensor([[0, 0], [1, 2], [3, 4]], dtype=torch.float32) / 10)
        rep.position.weight.copy_(torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], dtype=torch.float32) / 10)
        rep.target_position.copy_(torch.tensor([0.5, -0.5]))
    return model.eval()


def test_attention_score_scales_semantic_and_position_parts_separately() -> None:
    """score = <sem_i, sem_t> / sqrt(2d) + <pos_i, pos_t> / sqrt(d) (reference: attention_pytorch.py), not one
    1 / sqrt(3d) over the whole token."""
    model = _tiny_dare()
    att = model.tables.attention
    hist_item, hist_cate = torch.tensor([[1, 4]]), torch.tensor([[2, 1]])  # positions 2 and 1
    cand_item, cand_cate = torch.tensor([[3]]), torch.tensor([[1]])
    positions = history_positions(hist_item, 4)
    scores = model.search_stage.scores(att.history(hist_item, hist_cate, positions), att.target(cand_item, cand_cate),
                                       hist_item != 0)[0, 0]  # fmt: skip
    # target: item 3 = (1, 1), cate 1 = (1, 0), position (2, 0). Behaviour 0: item 1 (1, 0), cate 2 (0, 2), pos 2 (0, 1).
    # semantic <(1,1,1,0), (1,0,0,2)> = 1, position <(2,0), (0,1)> = 0 -> 1 / 2 + 0 / sqrt(2)
    # Behaviour 1: item 4 (2, 0), cate 1 (1, 0), pos 1 (1, 0): semantic 2 + 1 = 3, position 2 -> 3 / 2 + 2 / sqrt(2)
    expected = torch.tensor([1 / 2, 3 / 2 + 2 / 2**0.5])
    torch.testing.assert_close(scores, expected)


def test_mlp_input_is_target_pooled_and_their_product() -> None:
    """The head sees [v_t, p, v_t ⊙ p] with p = sum_i w_i e_i (reference: din_pytorch.py with use_cross_feature),
    9 * d wide, not [v_t, h, v_t ⊙ h] with h = p ⊙ v_t."""
    model = _tiny_dare()
    hist_item, hist_cate = torch.tensor([[1, 4]]), torch.tensor([[2, 1]])
    cand_item, cand_cate = torch.tensor([[3]]), torch.tensor([[1]])
    seen: list[torch.Tensor] = []
    hook = model.head.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        index, weight = model.search(hist_item, hist_cate, cand_item, cand_cate)
        model.score(hist_item, hist_cate, cand_item, cand_cate, index, weight)
    hook.remove()
    w = torch.softmax(torch.tensor([1 / 2, 3 / 2 + 2 / 2**0.5]), 0)  # the two scores above, both retrieved (K = 2)
    rep = model.tables.representation
    tokens = torch.stack([
        torch.cat([rep.item.weight[1], rep.cate.weight[2], rep.position.weight[2]]),
        torch.cat([rep.item.weight[4], rep.cate.weight[1], rep.position.weight[1]]),
    ]).detach()  # fmt: skip
    order = index[0, 0].tolist()  # retrieved columns, best first
    pooled = (weight[0, 0].unsqueeze(1) * tokens[order]).sum(0)
    torch.testing.assert_close(weight[0, 0], w[order])
    target = torch.cat([rep.item.weight[3], rep.cate.weight[1], rep.target_position]).detach()
    assert seen[0].shape == (1, 18)  # 9 * d
    torch.testing.assert_close(seen[0][0], torch.cat([target, pooled, target * pooled]))


def test_twin_proj_has_four_biased_projections_after_the_concatenation() -> None:
    """Reference `projection` model with mlp_position_after_concat: one Linear WITH bias on each of the
    attention and representation sides of the target and of the behaviours, 3d -> 3d."""
    model = make("twin-proj")
    layers = [model.search_stage.query, model.search_stage.key, model.representation_stage.value,
              model.representation_stage.target]  # fmt: skip
    for layer in layers:
        assert isinstance(layer, torch.nn.Linear) and layer.bias is not None
        assert layer.in_features == layer.out_features == 3 * 8
    # The target's representation goes through its own projection: changing its bias changes the logits.
    batch_ = batch(2, 9, 3)
    model.eval()
    with torch.no_grad():
        before = model(*batch_)
        model.representation_stage.target.bias.add_(0.5)  # type: ignore[union-attr]
        assert not torch.allclose(model(*batch_), before)
    assert make("dare").representation_stage.target is None and make("twin").search_stage.query is None


def test_aux_loss_is_on_by_default_with_the_reference_head() -> None:
    """Every published training script runs with -use_aux_loss True; the auxiliary MLP is one hidden layer of 200."""
    from training.train import TrainOptions

    cfg = ModelConfig(kind="dare", item_rows=ITEMS, cate_rows=CATES)
    assert cfg.aux_loss is True and TrainOptions().aux_loss is True and TrainOptions().aux_weight == 1.0
    model = build_model(cfg)
    assert model.aux_head is not None
    linears = [m for m in model.aux_head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9 * 16, 200), (200, 1)]


def test_recency_search_keeps_the_k_most_recent_behaviours() -> None:
    model = build_model(ModelConfig(kind="dare", item_rows=ITEMS, cate_rows=CATES, att_dim=8, repr_dim=8, top_k=K,
                                    max_position=50, search="recency"))  # fmt: skip
    randomize_for_tests(model)
    hist_item, hist_cate, cand_item, cand_cate = batch(2, 12, 4, pad=3)
    index, weight = model.search(hist_item, hist_cate, cand_item, cand_cate)
    assert sorted(index[0, 0].tolist()) == [7, 8, 9, 10, 11]  # the last K columns, whatever their scores
    assert torch.allclose(weight.sum(-1), torch.ones(2, 4))
    short_item, short_cate, _, _ = batch(1, 12, 1, pad=9)  # 3 real behaviours < K
    index, weight = model.search(short_item, short_cate, cand_item[:1], cand_cate[:1])
    assert sorted(index[0, 0].tolist()) == [-1, -1, 9, 10, 11] and weight[0, 0][index[0, 0] < 0].abs().sum() == 0


def test_a_run_folder_of_the_old_architecture_is_refused_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from training.run import RunFolderError, train_config_from_dict

    raw = {"model": {"kind": "dare", "item_rows": 10, "cate_rows": 5}}  # version 1 config.json had no version
    with pytest.raises(RunFolderError, match="model version 1.*MLP input became.*retrain"):
        train_config_from_dict(json.loads(json.dumps(raw)), tmp_path / "config.json")
