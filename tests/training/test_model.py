"""DARE / TWIN / TWIN-proj in PyTorch: shapes, gradient routing (the point of DARE), edge cases, eval mode."""

from __future__ import annotations

import pytest
import torch

from dare.errors import DareError
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
