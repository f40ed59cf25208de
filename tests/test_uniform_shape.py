"""allocator=uniform_shape (one shape for every kept layer) and allocator.multiple_of alignment,
against exhaustive searches written out here."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import compose_job, tiny_model
from prune_lab.core.adapter import layer_views
from prune_lab.allocator import Global, Layerwise, Uniform, UniformShape, align_plan
from prune_lab.errors import PruneLabError
from prune_lab.recipes.common import build
from prune_lab.core.scores import UnitScores


def random_scores(views, seed=0) -> UnitScores:
    gen = torch.Generator().manual_seed(seed)
    return UnitScores([torch.rand(v.attn.num_kv_heads, generator=gen) for v in views],
                      [torch.rand(v.mlp.width, generator=gen) ** 3 for v in views])


def brute_force_uniform(scores, views, target, max_removed, multiple_of=1):
    """Every (k, w, removed set): the most importance kept with removed params >= target."""
    K, W = views[0].attn.num_kv_heads, views[0].mlp.width
    gc, cc, P, n = views[0].attn.group_cost, views[0].mlp.channel_cost, views[0].num_params, len(views)
    q_unit = views[0].attn.group_size * views[0].attn.head_dim
    best = (-np.inf, None)
    for k in range(1, K + 1):
        if k != K and (k * q_unit) % multiple_of:
            continue
        for w in range(1, W + 1):
            if w != W and w % multiple_of:
                continue
            value = [scores.attn[i].sort(descending=True).values[:k].sum().item()
                     + scores.mlp[i].sort(descending=True).values[:w].sum().item() for i in range(n)]
            for r in range(0, min(max_removed, n - 1) + 1):
                for removed in itertools.combinations(range(n), r):
                    params = r * P + (n - r) * ((K - k) * gc + (W - w) * cc)
                    kept = sum(v for i, v in enumerate(value) if i not in removed)
                    if params >= target and kept > best[0] + 1e-9:
                        best = (kept, (k, w, set(removed)))
    return best


@pytest.mark.parametrize("ratio, max_removed, multiple_of",
                         [(0.25, 2, 1), (0.4, 1, 1), (0.3, 0, 1), (0.25, 2, 4)])
def test_uniform_shape_finds_the_exhaustive_optimum(ratio, max_removed, multiple_of):
    model = tiny_model("llama", layers=4, intermediate=12)
    views = layer_views(model)
    for seed in range(3):
        scores = random_scores(views, seed)
        alloc = UniformShape(ratio=ratio, max_removed_layers=max_removed, multiple_of=multiple_of)
        plan = alloc(scores, views)
        kept_value, (k, w, removed) = brute_force_uniform(scores, views, alloc.target(views), max_removed,
                                                          multiple_of)
        assert (alloc.choice["kv_groups"], alloc.choice["mlp_width"]) == (k, w)
        assert set(plan.layers) == removed
        assert plan.params_removed(views) >= plan.target_params
        kept = [i for i in range(4) if i not in removed]
        shapes = {(2 - len(plan.attn.get(i, [])), 12 - len(plan.mlp.get(i, []))) for i in kept}
        assert shapes == {(k, w)}
        got = sum(scores.attn[i].sum().item() - scores.attn[i][plan.attn.get(i, [])].sum().item()
                  + scores.mlp[i].sum().item() - scores.mlp[i][plan.mlp.get(i, [])].sum().item() for i in kept)
        assert got == pytest.approx(kept_value)


def test_uniform_shape_refuses_unmeetable_and_non_uniform():
    views = layer_views(tiny_model("llama", layers=3))
    with pytest.raises(PruneLabError, match="cannot be met"):
        UniformShape(ratio=0.9, max_removed_layers=0)(random_scores(views), views)
    model = tiny_model("llama", layers=3)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 40, bias=False)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(64, 40, bias=False)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(40, 64, bias=False)
    views = layer_views(model)
    with pytest.raises(PruneLabError, match="share one shape"):
        UniformShape()(random_scores(views), views)


@pytest.mark.parametrize("make", [lambda m: Global(ratio=0.2, multiple_of=m),
                                  lambda m: Uniform(ratio=0.2, multiple_of=m),
                                  lambda m: Layerwise(ratio=0.2, strategy="uniform", multiple_of=m)],
                         ids=["global", "uniform", "layerwise"])
@pytest.mark.parametrize("multiple_of", [4, 8])
def test_multiple_of_aligns_every_pruned_width_within_one_block(make, multiple_of):
    model = tiny_model("qwen2", layers=4, intermediate=48)       # 14 q / 2 kv heads, head_dim 8: G*hd = 56
    views = layer_views(model)
    scores = random_scores(views, 1)
    alloc = make(multiple_of)
    raw = alloc(scores, views, torch.tensor([0.5, 0.2, 0.9, 0.4]))
    plan = align_plan(raw, scores, views, multiple_of)
    kept_w = [48 - len(plan.mlp.get(i, [])) for i in range(4) if i not in plan.layers]
    assert all(w % multiple_of == 0 for w in kept_w)
    q_block = multiple_of // np.gcd(multiple_of, 56)
    assert all((2 - len(g)) % q_block == 0 for g in plan.attn.values())
    removed, target = plan.params_removed(views), raw.target_params
    block = multiple_of * views[0].mlp.channel_cost
    assert target <= removed < target + max(block, q_block * views[0].attn.group_cost)
    for i, idx in plan.mlp.items():                          # the lowest-scoring channels go
        kept = sorted(set(range(48)) - set(idx))
        assert scores.mlp[i][idx].max() <= scores.mlp[i][kept].min()


def test_multiple_of_larger_than_a_width_is_one_clear_line():
    views = layer_views(tiny_model("llama", layers=2, intermediate=48))
    plan = Global(ratio=0.2)(random_scores(views), views)
    qwen = layer_views(tiny_model("qwen2", layers=2, intermediate=48))   # 40 of 48 channels, no group
    with pytest.raises(PruneLabError, match="cannot be met with widths that are multiples of 8"):
        align_plan(Uniform(ratio=0.3)(random_scores(qwen), qwen), random_scores(qwen), qwen, 8)
    with pytest.raises(PruneLabError, match="multiple_of=64 is larger than layer 0's MLP width 48") as e:
        align_plan(plan, random_scores(views), views, 64)
    assert "\n" not in str(e.value)
    with pytest.raises(PruneLabError, match="must be >= 1"):
        build(compose_job("allocator.multiple_of=0").allocator)


def test_uniform_shape_composes_from_config():
    cfg = compose_job("allocator=uniform_shape", "allocator.multiple_of=64", "allocator.max_removed_layers=2")
    alloc = build(cfg.allocator)
    assert (type(alloc).__name__, alloc.multiple_of, alloc.max_removed_layers) == ("UniformShape", 64, 2)
