"""Adapter: per-architecture views and the exact parameter cost of one pruning unit."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

from conftest import ALL_ARCHS, TINY, tiny_model
from prune_lab.core.adapter import SUPPORTED_FAMILIES, decoder_linear_params, layer_shapes, layer_views
from prune_lab.errors import PruneLabError, UnsupportedArchitecture
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan

# arch -> (q/k/v carry a bias, has q_norm/k_norm)
FEATURES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True),
            "opt": (True, False)}


def all_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_views_report_the_architecture(arch):
    model = tiny_model(arch)
    shape = TINY[arch]
    has_bias, has_norm = FEATURES[arch]
    views = layer_views(model)
    assert [v.index for v in views] == [0, 1, 2]
    for v in views:
        a = v.attn
        assert a.num_heads == shape["num_attention_heads"]
        assert a.num_kv_heads == shape["num_key_value_heads"]
        assert a.head_dim == shape["head_dim"]
        assert a.group_size == shape["num_attention_heads"] // shape["num_key_value_heads"]
        assert [lin.bias is not None for lin in (a.q, a.k, a.v)] == [has_bias] * 3
        assert (a.o.bias is not None) == (arch == "opt")        # OPT: out_proj has a bias too
        assert (v.mlp.gate is None) == (arch == "opt")          # OPT: fc1 -> act -> fc2, no gate
        assert (a.q_norm is not None, a.k_norm is not None) == (has_norm, has_norm)
        assert v.mlp.width == 48
        assert v.num_params == a.num_params + v.mlp.num_params
    assert decoder_linear_params(model) == sum(v.num_params for v in views)
    assert layer_shapes(model)[0] == {"q_heads": shape["num_attention_heads"],
                                      "kv_heads": shape["num_key_value_heads"], "mlp_width": 48}


def test_qwen2_view_has_a_seven_to_one_gqa_ratio():
    assert layer_views(tiny_model("qwen2"))[0].attn.group_size == 7


@pytest.mark.parametrize("config", [
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0),
    GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                  vocab_size=64),
], ids=["gpt2", "gpt_neox"])
def test_unsupported_architecture_names_the_supported_families(config):
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitecture) as err:
        layer_views(model)
    assert isinstance(err.value, PruneLabError)
    message = str(err.value)
    assert config.model_type in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_unit_costs_equal_the_real_parameter_drop(arch):
    dense = tiny_model(arch)
    view = layer_views(dense)[1]
    for plan, cost in ((PruningPlan(attn={1: [1]}), view.attn.group_cost),
                       (PruningPlan(mlp={1: [5]}), view.mlp.channel_cost),
                       (PruningPlan(attn={1: [0]}, mlp={1: [0, 7, 9]}),
                        view.attn.group_cost + 3 * view.mlp.channel_cost)):
        pruned = apply_plan(copy.deepcopy(dense), plan)
        assert decoder_linear_params(dense) - decoder_linear_params(pruned) == cost
        assert all_params(dense) - all_params(pruned) == cost   # norms and embeddings are untouched
        assert plan.params_removed(layer_views(dense)) == cost


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_removing_every_unit_costs_the_whole_projection(arch):
    view = layer_views(tiny_model(arch))[0]
    out_bias = [0 if lin.bias is None else lin.bias.numel() for lin in (view.attn.o, view.mlp.down)]
    assert view.attn.num_kv_heads * view.attn.group_cost + out_bias[0] == view.attn.num_params
    assert view.mlp.width * view.mlp.channel_cost + out_bias[1] == view.mlp.num_params


def test_views_follow_pruned_widths():
    model = apply_plan(tiny_model("qwen2", intermediate=48), PruningPlan(attn={0: [1]}, mlp={2: [0, 1, 2]}))
    views = layer_views(model)
    assert (views[0].attn.num_heads, views[0].attn.num_kv_heads, views[0].attn.group_size) == (7, 1, 7)
    assert (views[1].attn.num_heads, views[1].attn.num_kv_heads) == (14, 2)
    assert [v.mlp.width for v in views] == [48, 48, 45]
    assert model.config.prune_lab["layers"][0] == {"q_heads": 7, "kv_heads": 1, "mlp_width": 48}
    assert isinstance(views[0].attn.q.weight, torch.nn.Parameter)
