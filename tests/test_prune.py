"""Executor: a pruned model computes exactly what the dense model with the same units zeroed does."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import ALL_ARCHS, TINY, left_padded, lively, tiny_model, tokens
from prune_lab.core.adapter import decoder_layers, decoder_linear_params, layer_views
from prune_lab.allocator import Global
from prune_lab.model import RandomModel
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan, zero_units
from prune_lab.core.scores import UnitScores

IMPLEMENTATIONS = ["sdpa", "eager"]
# Units of a 3-layer tiny model: a group in layers 0 and 2, channels in 0 and 2, layer 1 removed whole.
MIXED_PLAN = dict(attn={0: [1], 2: [0]}, mlp={0: [0, 5, 17], 2: list(range(0, 48, 3))}, layers=[1])
WIDTH_ONLY_PLAN = dict(attn={1: [0]}, mlp={0: [3, 4], 1: list(range(20)), 2: [47]})


@torch.no_grad()
def max_logit_difference(pruned, dense, plan, batch) -> float:
    """Max |logit difference| between the pruned model and the dense one with the units zeroed
    (zeroes `dense` in place: pass a copy)."""
    reference = zero_units(dense, plan)
    a = pruned(batch.to(pruned.device)).logits.float()
    b = reference(batch.to(reference.device)).logits.float()
    return (a - b).abs().max().item()


def pair(arch, plan_kwargs, impl="sdpa"):
    """(pruned model, dense twin with the plan's units zeroed, untouched dense model)."""
    dense = lively(tiny_model(arch, attn_implementation=impl))
    plan = PruningPlan(**plan_kwargs)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    return pruned, zero_units(copy.deepcopy(dense), plan), dense


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("plan_kwargs", [MIXED_PLAN, WIDTH_ONLY_PLAN], ids=["with_layer", "widths"])
def test_pruned_logits_equal_zeroed_dense_logits(arch, impl, plan_kwargs):
    pruned, zeroed, dense = pair(arch, plan_kwargs, impl)
    batch = tokens(2, 24)
    with torch.no_grad():
        a, b, c = (m(batch).logits for m in (pruned, zeroed, dense))
    assert (a - b).abs().max().item() < 1e-5
    assert (a - c).abs().max().item() > 1e-2      # the plan really changed the function


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_equivalence_when_several_groups_survive(arch):
    """4 KV heads: removing groups 0 and 2 must keep groups 1 and 3 with their own query heads."""
    shape = dict(TINY[arch], num_key_value_heads=4 if arch == "llama" else 7, num_hidden_layers=2,
                 intermediate_size=32, attention_bias=True)
    dense = lively(RandomModel(**shape, device="cpu").build())
    plan = PruningPlan(attn={0: [0, 2], 1: [1]}, mlp={1: [0, 31]})
    pruned = apply_plan(copy.deepcopy(dense), plan)
    assert [v.attn.num_kv_heads for v in layer_views(pruned)] == [shape["num_key_value_heads"] - 2,
                                                                   shape["num_key_value_heads"] - 1]
    assert max_logit_difference(pruned, dense, plan, tokens(2, 16)) < 1e-5


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_equivalence_with_a_left_padded_batch(arch, impl):
    pruned, zeroed, _ = pair(arch, MIXED_PLAN, impl)
    batch, mask = left_padded(tokens(3, 20, seed=1), pads=[0, 5, 11])
    with torch.no_grad():
        a, b = (m(batch, attention_mask=mask).logits for m in (pruned, zeroed))
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_generate_with_kv_cache_matches_zeroed_dense(arch):
    pruned, zeroed, _ = pair(arch, MIXED_PLAN)
    batch, mask = left_padded(tokens(2, 10, seed=2), pads=[0, 3])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        out_pruned = pruned.generate(batch, **kwargs)
        out_zeroed = zeroed.generate(batch, **kwargs)
        no_cache = pruned.generate(batch, **{**kwargs, "use_cache": False})
    assert out_pruned.shape == (2, 18)
    assert torch.equal(out_pruned, out_zeroed)
    assert torch.equal(out_pruned, no_cache)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shapes_ratio_and_config_after_pruning(arch):
    model = tiny_model(arch, layers=4)
    ratio = layer_views(model)[0].attn.group_size
    before = list(decoder_layers(model))
    plan = PruningPlan(attn={0: [0], 3: [1]}, mlp={2: [1, 2]}, layers=[1])
    apply_plan(model, plan)
    views = layer_views(model)
    assert [v.module for v in views] == [before[0], before[2], before[3]]
    assert [v.attn.group_size for v in views] == [ratio] * 3
    kv = TINY[arch]["num_key_value_heads"]                 # 2 (GQA) or 8 (OPT: one head per group)
    assert [v.attn.num_kv_heads for v in views] == [kv - 1, kv, kv - 1]
    assert [v.mlp.width for v in views] == [48, 46, 48]
    assert [v.module.self_attn.layer_idx for v in views] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 3
    assert model.config.prune_lab["removed_layers"] == [1]
    assert [s["kv_heads"] for s in model.config.prune_lab["layers"]] == [kv - 1, kv, kv - 1]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_global_plan_that_empties_a_layer_is_equivalent(arch):
    """Global with remove_empty_layers=True removes a layer whose units all score ~0."""
    dense = lively(tiny_model(arch))
    views = layer_views(dense)
    gen = torch.Generator().manual_seed(0)
    scores = UnitScores([torch.rand(v.attn.num_kv_heads, generator=gen) + 1 for v in views],
                        [torch.rand(v.mlp.width, generator=gen) + 1 for v in views])
    scores.attn[1] *= 1e-6
    scores.mlp[1] *= 1e-6
    ratio = (views[1].num_params + 3 * views[0].mlp.channel_cost) / decoder_linear_params(dense)
    plan = Global(ratio=ratio, remove_empty_layers=True)(scores, views)
    assert plan.layers == [1]
    assert sum(map(len, plan.mlp.values())) == 3
    pruned = apply_plan(copy.deepcopy(dense), plan)
    assert len(decoder_layers(pruned)) == 2
    assert max_logit_difference(pruned, dense, plan, tokens(2, 16)) < 1e-5


def test_zero_units_keeps_shapes_and_bypasses_removed_layers():
    model = lively(tiny_model("qwen2"))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    zero_units(model, PruningPlan(**MIXED_PLAN))
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    layer1 = layer_views(model)[1]
    assert layer1.attn.o.weight.abs().sum() == 0 and layer1.mlp.down.weight.abs().sum() == 0
    assert layer1.attn.q.weight.abs().sum() > 0        # only the outputs are silenced


def test_plans_that_break_the_model_are_refused():
    model = tiny_model("llama")
    for bad, words in ((PruningPlan(attn={0: [0, 1]}), "empties the attention"),
                       (PruningPlan(mlp={0: list(range(48))}), "empties the MLP"),
                       (PruningPlan(attn={5: [0]}), "layer 5"),
                       (PruningPlan(attn={0: [2]}), "bad KV-group"),
                       (PruningPlan(mlp={0: [-1]}), "bad MLP channel"),
                       (PruningPlan(layers=[0, 1, 2]), "every layer")):
        with pytest.raises(Exception) as err:
            apply_plan(model, bad)
        assert words in str(err.value)
    assert decoder_linear_params(model) == decoder_linear_params(tiny_model("llama"))


def test_pruning_twice_records_removed_layers_in_original_indices():
    model = tiny_model("llama", layers=4)
    apply_plan(model, PruningPlan(layers=[1]))
    apply_plan(model, PruningPlan(layers=[1], mlp={0: [0]}))     # layer 1 of 3 is original layer 2
    assert model.config.prune_lab["removed_layers"] == [1, 2]
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [s["mlp_width"] for s in model.config.prune_lab["layers"]] == [47, 48]
