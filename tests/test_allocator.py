"""Allocators: budgets, constraints and exact parameter accounting of the plans they produce."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from conftest import ARCHS, tiny_model
from prune_lab.core.adapter import decoder_linear_params, layer_views
from prune_lab.allocator import Depth, Global, Layerwise, Uniform, parse_distribution
from prune_lab.errors import BudgetError, PruneLabError
from prune_lab.importance import Magnitude, Random
from prune_lab.artifacts.layer_table import layer_table
from prune_lab.model import RandomModel
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan
from prune_lab.core.scores import UnitScores

LAYER_IMPORTANCE = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])   # layer 3 least, layer 0 most important


@pytest.fixture(scope="module")
def fine_model():
    """6 layers, 8 KV heads (G=2) and 64 channels: fine-grained enough to check rates and shares."""
    return RandomModel(arch="llama", hidden_size=64, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=4, num_hidden_layers=6, intermediate_size=64, device="cpu").build()


@pytest.fixture(scope="module")
def fine(fine_model):
    views = layer_views(fine_model)
    return views, Random()(fine_model, seed=0)


def counts(plan: PruningPlan, n_layers: int) -> tuple[list[int], list[int]]:
    return ([len(plan.attn.get(i, [])) for i in range(n_layers)],
            [len(plan.mlp.get(i, [])) for i in range(n_layers)])


def max_unit_cost(views) -> int:
    return max(max(v.attn.group_cost, v.mlp.channel_cost) for v in views)


# --- accounting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("make", [lambda: Global(0.3), lambda: Global(0.3, remove_empty_layers=True),
                                  lambda: Uniform(0.3), lambda: Layerwise(0.3)],
                         ids=["global", "global_removal", "uniform", "layerwise"])
def test_achieved_drop_is_exact_and_within_one_unit_of_target(arch, make):
    model = tiny_model(arch, layers=4)
    views = layer_views(model)
    plan = make()(Magnitude()(model), views, LAYER_IMPORTANCE[:4])
    before = decoder_linear_params(model)
    assert plan.target_params == round(0.3 * before)
    apply_plan(model, plan)
    achieved = before - decoder_linear_params(model)
    assert achieved == plan.params_removed(views)
    assert abs(achieved - plan.target_params) <= max_unit_cost(views)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_plan_csv_round_trip_applies_identically(arch, tmp_path):
    model = tiny_model(arch, layers=4)
    scores = Magnitude()(model)
    plan = Global(0.35, remove_empty_layers=True)(scores, layer_views(model))
    plan = PruningPlan(plan.attn, plan.mlp, plan.layers or [2], plan.target_params)
    plan.save(tmp_path / "plan.csv")
    loaded = PruningPlan.load(tmp_path / "plan.csv")
    assert loaded == plan
    a = apply_plan(copy.deepcopy(model), plan).state_dict()
    b = apply_plan(copy.deepcopy(model), loaded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_load_refuses_other_files(tmp_path):
    for name, text in (("missing.csv", None), ("wrong.csv", "a,b\n1,2\n"), ("empty.csv", "")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(PruneLabError, match="plan"):
            PruningPlan.load(path)


def test_same_seed_gives_the_same_plan(fine_model):
    views = layer_views(fine_model)
    plans = [Global(0.3)(Random()(fine_model, seed=s), views) for s in (7, 7, 8)]
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]
    again = [Layerwise(0.3)(Random()(fine_model, seed=7), views, LAYER_IMPORTANCE) for _ in range(2)]
    assert again[0] == again[1]


# --- uniform -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.45])
def test_uniform_prunes_the_same_groups_per_layer(fine, ratio):
    views, scores = fine
    plan = Uniform(ratio)(scores, views)
    groups, channels = counts(plan, 6)
    assert len(set(groups)) == 1 and groups[0] == round(ratio * 8)
    assert max(channels) - min(channels) <= 1
    assert abs(plan.params_removed(views) - plan.target_params) <= views[0].mlp.channel_cost / 2


def test_uniform_respects_the_layer_range_and_picks_lowest_scores(fine):
    views, scores = fine
    plan = Uniform(0.2, layer_start=1, layer_end=4)(scores, views)
    assert set(plan.attn) == set(plan.mlp) == {1, 2, 3}
    for i, removed in plan.mlp.items():
        kept = sorted(set(range(64)) - set(removed))
        assert scores.mlp[i][removed].max() <= scores.mlp[i][kept].min()


# --- layerwise -----------------------------------------------------------------------------------

def test_layerwise_freeze_and_range(fine):
    views, scores = fine
    plan = Layerwise(0.2, freeze_top_n=2)(scores, views, LAYER_IMPORTANCE)
    assert not {0, 4} & (set(plan.attn) | set(plan.mlp))          # the two most important layers
    assert {1, 3} <= set(plan.mlp)
    plan = Layerwise(0.1, layer_start=2, layer_end=5)(scores, views, LAYER_IMPORTANCE)
    assert set(plan.attn) | set(plan.mlp) <= {2, 3, 4}


def test_layerwise_inverse_prunes_unimportant_layers_more(fine):
    views, scores = fine
    _, channels = counts(Layerwise(0.25, distribution="0:10")(scores, views, LAYER_IMPORTANCE), 6)
    by_importance = [channels[i] for i in np.argsort(LAYER_IMPORTANCE.numpy())]
    assert by_importance == sorted(by_importance, reverse=True) and by_importance[0] > by_importance[-1]


def test_layerwise_min_and_max_rate(fine):
    views, scores = fine
    free = counts(Layerwise(0.08, distribution="0:10")(scores, views, LAYER_IMPORTANCE), 6)[1]
    assert min(free) < 6 and max(free) > 20                   # unclipped rates would leave [0.1, 0.3]
    _, channels = counts(Layerwise(0.08, min_rate=0.1, max_rate=0.3, distribution="0:10")(
        scores, views, LAYER_IMPORTANCE), 6)
    assert all(math.floor(0.1 * 64) <= c <= math.ceil(0.3 * 64) for c in channels)
    assert min(channels) <= math.ceil(0.1 * 64) and max(channels) >= math.floor(0.3 * 64)


def three_layer_rates(strategy: str, importance, **kwargs) -> np.ndarray:
    """Per-layer rates of a Layerwise plan on 3 equal, fine-grained layers (16 KV groups, 400 channels)."""
    model = RandomModel(arch="llama", hidden_size=64, num_attention_heads=32, num_key_value_heads=16,
                        head_dim=2, num_hidden_layers=3, intermediate_size=400, device="cpu").build()
    views = layer_views(model)
    plan = Layerwise(0.25, strategy=strategy, **kwargs)(Magnitude()(model), views, torch.tensor(importance))
    return layer_table(views, plan)["rate"].to_numpy()


def test_layerwise_strategies_match_the_original_three_layer_example():
    """Importance [0.8, 0.3, 0.7] at 25%: inverse gives about [15, 40, 20]% (the original's example).

    Reference: I/ΣI = [.444, .167, .389], w = 1/(I/ΣI + 0.01), rates = 0.75·w/Σw.
    """
    imp = [0.8, 0.3, 0.7]
    rel = np.array(imp) / sum(imp)
    for strategy, w in (("inverse", 1 / (rel + 0.01)), ("proportional", rel + 0.01), ("uniform", np.ones(3)),
                        ("inverse_minmax", 1 / (np.array([1.0, 0.0, 0.8]) + 0.01))):
        expected = 0.75 * w / w.sum()
        got = three_layer_rates(strategy, imp, distribution="0:10")
        assert got == pytest.approx(expected, abs=0.005), strategy
    assert three_layer_rates("inverse", imp, distribution="0:10") == pytest.approx([0.15, 0.40, 0.20], abs=0.02)
    # proportional prunes the important layers more; with attention in the split the rates stay close
    got = three_layer_rates("proportional", imp)
    assert got[0] > got[2] > got[1]
    assert got.mean() == pytest.approx(0.25, abs=0.01)


def test_layerwise_log_transform_tames_an_outlier():
    imp = [3478.0, 0.5, 11.0]        # removal scores with layer 0 as an outlier
    plain = three_layer_rates("inverse", imp, distribution="0:10")
    logged = three_layer_rates("inverse", imp, distribution="0:10", log_transform=True)
    rel = np.log1p(imp) / np.log1p(imp).sum()
    w = 1 / (rel + 0.01)
    assert logged == pytest.approx(0.75 * w / w.sum(), abs=0.005)
    # plain I/ΣI is ~0 for both small layers (11 and 0.5 look alike next to 3478); log separates them
    assert plain[0] < logged[0] and logged[1] / logged[2] > 2 * plain[1] / plain[2]


def test_layer_table_rates_for_every_allocator(fine):
    views, scores = fine
    for allocator in (Uniform(0.3), Global(0.3), Layerwise(0.3), Depth(n_layers=2)):
        plan = allocator(scores, views, LAYER_IMPORTANCE)
        df = layer_table(views, plan, LAYER_IMPORTANCE)
        assert df["importance"].tolist() == LAYER_IMPORTANCE.tolist()
        assert df["params_pruned"].sum() == plan.params_removed(views)
        for i, row in df.iterrows():
            removed = i in plan.layers
            assert row["attn_rate"] == (1.0 if removed else len(plan.attn.get(i, [])) / 8)
            assert row["mlp_rate"] == (1.0 if removed else len(plan.mlp.get(i, [])) / 64)


@pytest.mark.parametrize("distribution, attn_share", [("0:10", 0.0), ("10:0", 1.0), ("3:7", 0.3), ("1:1", 0.5)])
def test_layerwise_distribution_splits_the_budget(fine, distribution, attn_share):
    views, scores = fine
    plan = Layerwise(0.3, distribution=distribution)(scores, views, LAYER_IMPORTANCE)
    attn_removed = sum(len(g) * views[i].attn.group_cost for i, g in plan.attn.items())
    mlp_removed = sum(len(c) * views[i].mlp.channel_cost for i, c in plan.mlp.items())
    if attn_share == 0:
        assert attn_removed == 0 and mlp_removed > 0
    elif attn_share == 1:
        assert mlp_removed == 0 and attn_removed > 0
    assert abs(attn_removed - attn_share * plan.target_params) <= views[0].attn.group_cost
    assert abs(attn_removed + mlp_removed - plan.target_params) <= max_unit_cost(views)


# --- global --------------------------------------------------------------------------------------

def test_global_table_columns_and_ascending_order(fine):
    views, scores = fine
    allocator = Global(0.3)
    plan = allocator(scores, views)
    table = allocator.table
    assert {"layer", "type", "index", "importance", "cost", "score", "pruned"} <= set(table.columns)
    assert len(table) == 6 * (8 + 64)
    assert np.allclose(table["score"], table["importance"] / table["cost"])
    assert table["score"].is_monotonic_increasing
    best = table.groupby(["layer", "type"])["score"].transform("max") == table["score"]
    for kind in ("attn_group", "mlp_channel"):     # per type, pruned units are a prefix in score order
        rows = table[(table["type"] == kind) & ~best]
        pruned = rows["pruned"].to_numpy()
        assert pruned.any() and not (np.diff(pruned.astype(int)) > 0).any()
    assert table["pruned"].sum() == sum(map(len, plan.attn.values())) + sum(map(len, plan.mlp.values()))


def test_global_standardized_scores_are_flaps_per_layer_z_scores_and_ignore_a_layers_scale(fine):
    """score_norm=standardize (FLAP AL-AM): z-scores within each layer's groups / channels, so a layer
    whose scores are all 1000x larger loses as many units as before, not none."""
    views, scores = fine
    allocator = Global(0.3, score_norm="standardize")
    plan = allocator(scores, views)
    table = allocator.table
    for (layer, kind), rows in table.groupby(["layer", "type"]):     # slow reference, one part at a time
        imp = rows["importance"].to_numpy()
        assert np.allclose(rows["score"], (imp - imp.mean()) / imp.std(ddof=1))
    scaled = UnitScores([s.clone() for s in scores.attn], [s.clone() for s in scores.mlp])
    scaled.attn[4] *= 1000
    scaled.mlp[4] *= 1000
    assert counts(Global(0.3, score_norm="standardize")(scaled, views), 6) == counts(plan, 6)
    assert counts(Global(0.3)(scaled, views), 6)[1][4] == 0            # importance / cost: spared
    with pytest.raises(PruneLabError, match="allocator.score_norm must be one of none, standardize"):
        Global(0.3, score_norm="zscore")


def test_global_without_removal_keeps_a_group_and_a_channel_everywhere(fine):
    views, scores = fine
    scores = UnitScores([s.clone() for s in scores.attn], [s.clone() for s in scores.mlp])
    scores.attn[2] *= 1e-6
    scores.mlp[2] *= 1e-6
    plan = Global(0.6)(scores, views)
    groups, channels = counts(plan, 6)
    assert plan.layers == [] and groups[2] == 7 and channels[2] == 63
    assert all(g <= 7 for g in groups) and all(c <= 63 for c in channels)


def test_global_removal_never_leaves_a_layer_half_empty(fine):
    views, scores = fine
    scores = UnitScores([s.clone() + 1 for s in scores.attn], [s.clone() + 1 for s in scores.mlp])
    scores.attn[2] *= 1e-6             # attention of layer 2 is worthless, its MLP is not
    plan = Global(0.3, remove_empty_layers=True)(scores, views)
    assert plan.layers == [] and len(plan.attn[2]) == 7


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.95])
def test_global_removal_reaches_budgets_beyond_one_unit_per_layer(fine_model, ratio):
    """Keeping one group and one channel per layer caps the no-removal ratio at ~0.93 here."""
    model = copy.deepcopy(fine_model)
    views = layer_views(model)
    scores = Magnitude()(model)
    if ratio > 0.93:
        with pytest.raises(BudgetError, match="remove_empty_layers=true"):
            Global(ratio)(scores, views)
    allocator = Global(ratio, remove_empty_layers=True)
    plan = allocator(scores, views)
    assert len(plan.layers) >= (1 if ratio > 0.93 else 0)
    kept = allocator.table[~allocator.table["layer"].isin(plan.layers)]
    assert not kept.groupby(["layer", "type"])["pruned"].all().any()      # no kept layer half-empty
    before = decoder_linear_params(model)
    apply_plan(model, plan)
    assert abs(before - decoder_linear_params(model) - plan.target_params) <= max_unit_cost(views)


# --- depth ---------------------------------------------------------------------------------------

def test_depth_removes_the_least_important_layers(fine):
    views, scores = fine
    total = sum(v.num_params for v in views)
    explicit = Depth(n_layers=2)(scores, views, LAYER_IMPORTANCE)
    assert explicit.layers == [1, 3] and explicit.target_params == views[1].num_params + views[3].num_params
    auto = Depth(ratio=0.5)(scores, views, LAYER_IMPORTANCE)            # 3 of 6 equal layers
    assert auto.layers == [1, 3, 5] and auto.target_params == round(0.5 * total)
    assert Depth(ratio=0.3, layer_start=4)(scores, views, LAYER_IMPORTANCE).layers == [4, 5]
    assert Depth(n_layers=1, layer_start=4)(scores, views, LAYER_IMPORTANCE).layers == [5]
    assert Depth(ratio=0.95)(scores, views, LAYER_IMPORTANCE).layers == [1, 2, 3, 4, 5]   # one stays
    assert Depth(ratio=0.0)(scores, views, LAYER_IMPORTANCE).layers == []


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("cls", [Uniform, Global, Layerwise, Depth])
def test_ratio_outside_unit_interval(cls, ratio):
    with pytest.raises(PruneLabError, match=r"ratio must be in \[0, 1\)"):
        cls(ratio=ratio)


@pytest.mark.parametrize("text", ["3-7", "a:b", "1:2:3", "-1:5", "0:0", "nan:1", "inf:1", ""])
def test_malformed_distribution(text):
    with pytest.raises(PruneLabError, match="distribution"):
        Layerwise(distribution=text)


def test_distribution_parses_shares():
    assert parse_distribution("3:7") == pytest.approx((0.3, 0.7))
    assert parse_distribution("0:10") == (0.0, 1.0)


def test_unmeetable_budgets_raise_budget_error(fine):
    views, scores = fine
    with pytest.raises(BudgetError, match="remove_empty_layers"):
        Global(0.95)(scores, views)
    with pytest.raises(BudgetError, match="ratio"):
        Uniform(0.5, layer_start=4)(scores, views)          # two layers cannot hold half the model
    with pytest.raises(BudgetError, match="ratio"):
        Layerwise(0.6, distribution="10:0")(scores, views, LAYER_IMPORTANCE)   # > all but one group
    with pytest.raises(BudgetError, match="freeze"):
        Layerwise(0.2, freeze_top_n=6)(scores, views, LAYER_IMPORTANCE)


def test_non_finite_scores_are_refused(fine):
    views, scores = fine
    bad = UnitScores([s.clone() for s in scores.attn], [s.clone() for s in scores.mlp])
    bad.mlp[3][5] = float("nan")
    with pytest.raises(PruneLabError, match="NaN/inf"):
        bad.check_finite()
    for allocator in (Global(0.2), Uniform(0.2), Layerwise(0.2)):
        with pytest.raises(PruneLabError, match="NaN/inf"):
            allocator(bad, views, LAYER_IMPORTANCE)
    with pytest.raises(PruneLabError, match="NaN/inf"):
        Depth(n_layers=1)(scores, views, torch.tensor([1.0, float("inf"), 1, 1, 1, 1]))


def test_scores_of_another_model_are_refused(fine):
    views, scores = fine
    with pytest.raises(PruneLabError, match="do not match"):
        Global(0.2)(UnitScores(scores.attn[:3], scores.mlp[:3]), views)
    with pytest.raises(PruneLabError, match="layer importance has 4 values"):
        Depth(n_layers=1)(scores, views, torch.ones(4))


@pytest.mark.parametrize("start, end", [(4, 2), (-1, 3), (3, 3)])
def test_empty_or_negative_layer_range_fails_when_built(start, end):
    for cls in (Uniform, Global, Layerwise, Depth):          # configuration only: before any model
        with pytest.raises(PruneLabError, match="empty or negative"):
            cls(0.1, layer_start=start, layer_end=end)


@pytest.mark.parametrize("start, end", [(0, 7), (6, None)])
def test_layer_range_outside_the_model(fine, start, end):
    views, scores = fine
    for allocator in (Uniform(0.1, layer_start=start, layer_end=end),
                      Global(0.1, layer_start=start, layer_end=end),
                      Layerwise(0.1, layer_start=start, layer_end=end),
                      Depth(0.1, layer_start=start, layer_end=end)):
        with pytest.raises(PruneLabError, match="outside the model's 6 layers"):
            allocator(scores, views, LAYER_IMPORTANCE)


def test_depth_layer_count_out_of_range(fine):
    views, scores = fine
    for n in (6, -1):
        with pytest.raises(PruneLabError, match="cannot remove"):
            Depth(n_layers=n)(scores, views, LAYER_IMPORTANCE)
    with pytest.raises(PruneLabError, match="needs layer importance"):
        Depth(n_layers=1)(scores, views, None)
