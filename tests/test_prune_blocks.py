"""Emptied blocks (plan.attn_blocks / mlp_blocks): a layer loses its whole attention or its whole MLP
and stays; the pruned model (0 heads / width 0) computes what the dense model with those blocks'
o_proj / down_proj weights zeroed does."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import ALL_ARCHS, left_padded, lively, tiny_model, tokens
from prune_lab.core.adapter import decoder_layers, decoder_linear_params, layer_views
from prune_lab.core.executor import apply_plan, zero_units
from prune_lab.core.plan import PruningPlan

# 4 layers: layer 0 loses its attention, layer 2 its MLP, layer 3 both (so it goes whole), plus units
BLOCK_PLAN = dict(attn={1: [0]}, mlp={0: [3, 4], 1: list(range(10))}, attn_blocks=[0, 3], mlp_blocks=[2, 3])


def test_a_layer_in_both_block_lists_is_removed_whole():
    plan = PruningPlan(**BLOCK_PLAN)
    assert plan.layers == [3] and plan.attn_blocks == [0] and plan.mlp_blocks == [2]
    plan = PruningPlan(attn={0: [1]}, mlp={2: [5]}, attn_blocks=[0], mlp_blocks=[2])
    assert plan.attn == {} and plan.mlp == {}          # a block's units go with it


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_emptied_blocks_are_equivalent_on_a_padded_batch(arch, impl):
    dense = lively(tiny_model(arch, layers=4, attn_implementation=impl))
    views = layer_views(dense)
    if arch == "opt":                  # OPT's attention cannot run without heads: the plan is refused
        with pytest.raises(Exception, match="attention of layer 0 .* cannot run without heads"):
            apply_plan(copy.deepcopy(dense), PruningPlan(**BLOCK_PLAN))
    plan = PruningPlan(**{**BLOCK_PLAN, "attn_blocks": [3]}) if arch == "opt" else PruningPlan(**BLOCK_PLAN)
    before = decoder_linear_params(dense)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    assert before - decoder_linear_params(pruned) == plan.params_removed(views)
    pv = layer_views(pruned)
    assert len(decoder_layers(pruned)) == 3
    assert pv[0].mlp.width == 46
    assert pv[2].mlp.width == 0 and pv[2].attn.num_kv_heads == views[2].attn.num_kv_heads
    assert pruned.config.prune_lab["layers"][2]["mlp_width"] == 0
    if arch != "opt":
        assert (pv[0].attn.num_heads, pv[0].attn.num_kv_heads) == (0, 0)
        assert pv[0].attn.module.num_key_value_groups == views[0].attn.group_size   # never 0/0
        assert pruned.config.prune_lab["layers"][0]["q_heads"] == 0
    zeroed = zero_units(copy.deepcopy(dense), plan)
    batch, mask = left_padded(tokens(3, 20, seed=1), pads=[0, 5, 11])
    with torch.no_grad():
        a, b, c = (m(batch, attention_mask=mask).logits for m in (pruned, zeroed, dense))
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max().item() < 1e-5
    assert (a[valid] - c[valid]).abs().max().item() > 1e-2      # the blocks really went


def test_block_plan_summary_and_csv_round_trip(tmp_path):
    model = tiny_model("llama", layers=4)
    views = layer_views(model)
    plan = PruningPlan(**BLOCK_PLAN, target_params=123)
    s = plan.summary(views)
    assert s["attn_blocks_removed"] == [0] and s["mlp_blocks_removed"] == [2] and s["layers_removed"] == [3]
    assert s["params_removed"] == (views[3].num_params + views[0].attn.num_params + views[2].mlp.num_params
                                   + views[1].attn.group_cost + 12 * views[1].mlp.channel_cost)
    plan.save(tmp_path / "plan.csv")
    assert PruningPlan.load(tmp_path / "plan.csv") == plan


def test_emptied_blocks_are_refused_out_of_range():
    model = tiny_model("llama")
    for bad in (PruningPlan(attn_blocks=[3]), PruningPlan(mlp_blocks=[-1])):
        with pytest.raises(Exception, match="model has 3 layers"):
            apply_plan(model, bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "opt"])
def test_a_checkpoint_with_emptied_blocks_reloads_to_the_same_logits(arch, tmp_path):
    from prune_lab import load_pruned
    from prune_lab.artifacts.checkpoint import save_pruned
    model = lively(tiny_model(arch, layers=4))
    plan = PruningPlan(attn={1: [0]}, mlp={0: [2]}, attn_blocks=[] if arch == "opt" else [2], mlp_blocks=[1])
    apply_plan(model, plan)
    save_pruned(model, None, tmp_path / "ckpt")
    reloaded = load_pruned(tmp_path / "ckpt")
    shapes = reloaded.config.prune_lab["layers"]
    assert shapes[1]["mlp_width"] == 0 and (arch == "opt" or shapes[2]["q_heads"] == shapes[2]["kv_heads"] == 0)
    batch, mask = left_padded(tokens(2, 12, seed=3), pads=[0, 4])
    with torch.no_grad():
        a, b = (m(batch, attention_mask=mask).logits for m in (reloaded, model))
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["lstsq", "obs", "bias"])
def test_reconstruct_skips_an_emptied_block_and_refits_the_rest_on_its_zero_output(mode):
    """A block with no kept unit has nothing to refit; the pruned path sees its output as zero: the refit
    equals the one of a model whose o_proj was zeroed beforehand, with the block left out of the plan."""
    from prune_lab.engine import Engine
    from prune_lab.reconstruct import Reconstruct
    batches = [tokens(2, 64, seed=s) for s in range(3)]
    plan = PruningPlan(attn={0: [1]}, mlp={1: [0, 5, 9], 2: [3]}, attn_blocks=[1])
    model = lively(tiny_model("llama"))
    twin = copy.deepcopy(model)
    layer_views(twin)[1].attn.o.weight.data.zero_()
    engine = Engine("cpu", progress=False)
    final, rows = Reconstruct(mode)(model, plan, batches, engine)
    twin_final, _ = Reconstruct(mode)(twin, PruningPlan(attn=plan.attn, mlp=plan.mlp), batches, engine)
    assert final.attn_blocks == [1] and final.mlp == twin_final.mlp and final.attn == twin_final.attn
    assert not [r for r in rows if r["layer"] == 1 and r["kind"] == "attn"]
    a, b = layer_views(model), layer_views(twin)
    assert a[1].attn.o.weight.abs().sum() == 0
    for i in range(3):
        assert torch.allclose(a[i].mlp.down.weight, b[i].mlp.down.weight, atol=1e-6)
    pruned = apply_plan(copy.deepcopy(model), final)
    with torch.no_grad():
        x = tokens(2, 16, seed=7)
        assert (pruned(x).logits - zero_units(copy.deepcopy(model), final)(x).logits).abs().max() < 1e-5


def test_gptq_over_a_model_with_emptied_blocks_quantizes_every_other_linear():
    """quant=uniform after pruning: an emptied block's linears (0 rows / 0 columns) have nothing to sweep."""
    from prune_lab.engine import walk
    from prune_lab.method import SparseGPT
    from prune_lab.quant import Uniform
    model = apply_plan(lively(tiny_model("llama", intermediate=64)), PruningPlan(attn_blocks=[1], mlp_blocks=[2]))
    method = SparseGPT(prune_n=0, prune_m=0, blocksize=16).with_quant(Uniform(4, group_size=16))
    walk(model, [tokens(4, 32, seed=s) for s in range(2)], method, progress=False)
    grids = method.grids_by_name()
    assert "model.layers.1.self_attn.q_proj.weight" not in grids and "model.layers.2.mlp.down_proj.weight" not in grids
    assert "model.layers.1.mlp.down_proj.weight" in grids and "model.layers.2.self_attn.o_proj.weight" in grids
    assert len(grids) == 3 * 7 - 4 - 3


def test_a_saved_model_with_emptied_blocks_evaluates_in_a_job_and_refuses_pruning_again(tmp_path):
    from conftest import TINY, compose_job, run_cli, tiny_overrides
    from prune_lab.artifacts.checkpoint import save_pruned
    from prune_lab.errors import PruneLabError
    from prune_lab.model import RandomModel
    from prune_lab.recipes import run
    tiny = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model")] + ["output.plots=false"]
    loader = RandomModel(**TINY["llama"], num_hidden_layers=3, intermediate_size=48, device="cpu")
    model, tokenizer = loader.load()
    apply_plan(model, PruningPlan(mlp={0: [1]}, attn_blocks=[1], mlp_blocks=[2]))
    save_pruned(model, tokenizer, tmp_path / "ckpt")
    job = [*tiny, "model=pruned", f"model.path={tmp_path / 'ckpt'}"]
    run(compose_job(*job, "allocator.ratio=0"), tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["status"] == "ok" and m["model"]["dense"]["num_layers"] == 3
    with pytest.raises(PruneLabError, match=r"layers \[1, 2\] of this model have no attention or no MLP"):
        run(compose_job(*job, "allocator.ratio=0.2"), tmp_path / "again")
    proc = run_cli(*job, "allocator.ratio=0.2", run_dir=tmp_path / "cli", cache=tmp_path / "cache")
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and "pruning it again is not supported" in errors[0], errors
