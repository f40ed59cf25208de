"""allocator=search: the level ladder and budget, the level database against a direct least-squares
reference, the KL fitness, both searchers end to end (deterministic, exact budget), and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, text_job, tiny_model, tiny_overrides, tokens
from prune_lab.allocator import Search
from prune_lab.allocator.search.budget import Budget
from prune_lab.allocator.search.fitness import Fitness
from prune_lab.allocator.search.levels import Database, LevelBuilder, OnDisk, ladder, removed_params
from prune_lab.allocator.search.shapes import to_plan
from prune_lab.core.adapter import layer_views
from prune_lab.engine import Engine
from prune_lab.errors import PruneLabError
from prune_lab.recipes import run

SMALL = ["allocator=search", "allocator.fitness_tokens=256", "allocator.stages=2", "allocator.generations=3",
         "allocator.offspring=4", "allocator.mlp_step=0.125", "calibration.n_samples=8", "output.plots=false"]


def database(model, batches, mlp_step=0.125):
    views = layer_views(model)
    parts = ladder(views, mlp_step, 1, np.ones(len(views), dtype=bool))
    db = Database(parts)
    Engine("cpu", progress=False).walk(model, batches, LevelBuilder(db, 0.01), propagate="dense")
    return views, parts, db


def test_ladder_levels_keep_a_unit_and_the_budget_repairs_to_within_one_step():
    model = tiny_model("qwen2", intermediate=48)          # 2 KV groups of 7 heads, MLP 48
    views = layer_views(model)
    parts = ladder(views, 0.125, 1, np.array([True, True, False]))
    attn, mlp = parts[0], parts[1]
    assert (attn.units, attn.step, attn.top) == (2, 1, 1) and (mlp.units, mlp.step, mlp.top) == (48, 6, 7)
    assert mlp.removed(mlp.top) == 42 and parts[4].top == parts[5].top == 0     # layer 2 outside the range
    budget = Budget(parts, int(0.3 * sum(v.num_params for v in views)))
    rng = np.random.default_rng(0)
    for _ in range(20):
        levels = budget.repair(rng.integers(0, budget.top + 1), rng)
        assert budget.feasible(levels) and (levels <= budget.top).all() and (levels >= 0).all()
    assert budget.feasible(budget.repair(budget.project(np.ones(len(parts))), rng))


def test_every_level_is_the_least_squares_refit_of_its_greedy_units(arch):
    torch.manual_seed(0)
    model = tiny_model(arch, intermediate=32)
    batches = [tokens(2, 64, seed=s) for s in range(3)]
    views, parts, db = database(model, batches)
    i = next(j for j, p in enumerate(parts) if p.kind == "mlp" and p.layer == 1)
    down = views[1].mlp.down
    captured = []                    # a slow reference: the dense inputs of layer 1's down_proj
    h = down.register_forward_hook(lambda m, inp, out: captured.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    x = torch.cat(captured).double()
    g = x.T @ x
    w = down.weight.double()
    assert torch.equal(db.weights[i][0], down.weight.detach())
    for level in (1, parts[i].top):
        keep = torch.tensor(sorted(set(range(32)) - set(db.order[i][:parts[i].removed(level)])))
        gk = g[keep][:, keep]
        ref = torch.zeros_like(w)
        ref[:, keep] = torch.linalg.solve(gk + 0.01 * gk.diagonal().mean() * torch.eye(len(keep), dtype=g.dtype),
                                          (w @ g[:, keep]).T).T
        assert torch.allclose(db.weights[i][level].double(), ref, rtol=1e-4, atol=1e-6)
        assert (db.weights[i][level][:, sorted(set(range(32)) - set(keep.tolist()))] == 0).all()


def test_fitness_is_zero_for_the_dense_levels_and_leaves_the_weights_as_they_were():
    model = tiny_model("llama", intermediate=32)
    batches = [tokens(2, 32, seed=s) for s in range(2)]
    _, parts, db = database(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitness = Fitness(model, db, batches, "kl")
    assert fitness(np.zeros(len(parts), dtype=int)) == pytest.approx(0.0, abs=1e-9)
    top = np.array([p.top for p in parts])
    assert fitness(top) > 1e-4 and fitness(top, 1) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fitness.evaluations == 3 and fitness.tokens == 2 * 128 + 64      # two full evaluations + one batch
    assert fitness(top) == fitness(top, 2) and fitness.evaluations == 3      # evaluated once per token count
    ppl = Fitness(model, db, batches, "ppl")
    assert ppl(top) > ppl(np.zeros(len(parts), dtype=int)) - 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_candidate_run_from_the_anchors_kept_layer_inputs_has_the_full_forwards_fitness(arch, attn):
    """Prefix reuse: a candidate that differs from the anchor first at layer l runs layers l.. only,
    and its fitness equals a fresh Fitness's full forward (sdpa and eager attention)."""
    model = tiny_model(arch, layers=4, intermediate=32, attn_implementation=attn)
    batches = [tokens(2, 16, seed=s) for s in range(2)]
    _, parts, db = database(model, batches, mlp_step=0.25)
    rng = np.random.default_rng(1)
    top = np.array([p.top for p in parts])
    anchor = rng.integers(0, top + 1)
    fast = Fitness(model, db, batches, "kl")
    fast.anchor(anchor)
    assert fast.layers_run == 0 and fast.evaluations == 0            # its layer inputs: when first needed
    for n, layer in enumerate((2, 3, 0)):
        child = anchor.copy()
        i = max(i for i, p in enumerate(parts) if p.layer == layer)     # the layer's MLP part
        child[i] = (child[i] + 1) % (top[i] + 1)
        run_before = fast.layers_run
        value = fast(child)
        anchor_run = 4 * len(batches) if n == 0 else 0                  # the anchor's inputs, once
        assert fast.layers_run - run_before == anchor_run + (4 - layer) * len(batches)
        slow = Fitness(model, db, batches, "kl")
        assert value == pytest.approx(slow(child), rel=1e-5, abs=1e-9)
    assert fast(child, [1]) == pytest.approx(Fitness(model, db, batches, "kl")(child, [1]), rel=1e-5, abs=1e-9)
    run_before = fast.layers_run
    fast.anchor(child)                                   # inherited from its evaluation just now: nothing run
    assert fast.layers_run == run_before
    assert fast(anchor) == pytest.approx(Fitness(model, db, batches, "kl")(anchor), rel=1e-5, abs=1e-9)


def test_the_anchor_itself_runs_only_its_last_layer_where_its_inputs_are_kept():
    model = tiny_model("llama", layers=4, intermediate=32)
    batches = [tokens(2, 16, seed=s) for s in range(3)]
    _, parts, db = database(model, batches, mlp_step=0.25)
    levels = np.array([p.top for p in parts])
    f = Fitness(model, db, batches, "kl")
    f.anchor(levels)
    first = f(levels, [0, 1])                            # nothing kept: full forwards, then kept
    assert f.layers_run == 4 * 2
    again = f(levels, [0, 1, 2])                         # windows 0, 1 from the last layer; 2 in full
    assert f.layers_run == 4 * 2 + 1 * 2 + 4
    assert first == pytest.approx(Fitness(model, db, batches, "kl")(levels, [0, 1]), rel=1e-5, abs=1e-9)
    assert again == pytest.approx(Fitness(model, db, batches, "kl")(levels), rel=1e-5, abs=1e-9)


def test_the_error_seed_is_the_cheapest_shape_under_the_budget_for_convex_level_errors():
    """Slow reference: every combination of levels of 4 parts removing the budget; with convex per-part
    errors and equal step costs the greedy (least error per parameter first) is optimal."""
    import itertools
    from prune_lab.allocator.search.levels import Part
    from prune_lab.allocator.search.seeds import error_seed
    rng = np.random.default_rng(3)
    parts = [Part(i // 2, "attn" if i % 2 == 0 else "mlp", 4, 1, 10) for i in range(4)]
    curv = rng.uniform(0.5, 2.0, 4)
    errors = [[float(c * lv ** 2) for lv in range(p.top + 1)] for p, c in zip(parts, curv)]
    db = Database(parts, order=[[] for _ in parts], weights=[[] for _ in parts], errors=errors,
                  energy=[1.0] * 4)
    budget = Budget(parts, 80)
    seed = error_seed(db, budget, relative=False, rng=rng)
    assert budget.feasible(seed)

    def total(lv):
        return sum(errors[i][int(v)] for i, v in enumerate(lv))
    assert budget.params(seed) == 80
    best = min((lv for lv in itertools.product(*(range(p.top + 1) for p in parts))
                if budget.params(np.array(lv)) == 80), key=total)
    assert total(seed) == pytest.approx(total(best))
    db.energy = [1.0, 100.0, 1.0, 1.0]                     # absolute errors: part 1 becomes dear
    assert error_seed(db, budget, relative=False, rng=rng)[1] <= seed[1]
    assert (error_seed(db, budget, relative=True, rng=rng) == seed).all()


def test_the_database_records_each_levels_output_error_relative_to_the_dense_output():
    model = tiny_model("llama", intermediate=32)
    batches = [tokens(2, 32, seed=s) for s in range(2)]
    _, parts, db = database(model, batches)
    for i, p in enumerate(parts):
        assert db.errors[i][0] == pytest.approx(0.0, abs=1e-12) and db.energy[i] > 0
        assert len(db.errors[i]) == p.top + 1
        assert all(b >= a - 1e-9 for a, b in zip(db.errors[i], db.errors[i][1:]))   # nested levels


@pytest.mark.parametrize("searcher", ["evolution", "optuna"])
def test_search_end_to_end_is_deterministic_and_meets_the_budget(tmp_path, searcher):
    extra = [*SMALL, f"allocator.searcher={searcher}", "cache.enabled=false"]
    run(text_job(tmp_path, *extra), tmp_path / "a")
    run(text_job(tmp_path, *extra), tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert a["status"] == "ok" and a["search"]["searcher"] == searcher
    assert (tmp_path / "a" / "plan.csv").read_text() == (tmp_path / "b" / "plan.csv").read_text()
    assert a["search"]["levels"] == b["search"]["levels"] and a["pruned"] == b["pruned"]
    assert 0 < a["search"]["decoder_layers_run"] == b["search"]["decoder_layers_run"]
    channel = 3 * 64                                       # one MLP channel of the tiny llama
    assert abs(a["plan"]["params_removed"] - a["plan"]["target_params"]) <= channel / 2
    assert a["search"]["best_fitness"] <= min(a["search"]["seed_fitness"].values()) + 1e-12
    assert a["search"]["evaluations"] >= 3 and len(a["search"]["trajectory"]) >= 2
    if searcher == "optuna":
        import optuna
        study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'a' / 'search.db'}")
        assert len(study.trials) == 3 * 4


def test_the_database_on_disk_holds_the_same_levels_and_is_gone_after_the_search(tmp_path):
    model = tiny_model("llama", intermediate=32)
    batches = [tokens(2, 32, seed=s) for s in range(2)]
    _, parts, mem = database(model, batches)
    disk = Database(parts, store=tmp_path)
    Engine("cpu", progress=False).walk(model, batches, LevelBuilder(disk, 0.01), propagate="dense")
    assert len(list(tmp_path.glob("part*.safetensors"))) == len(parts) and disk.nbytes == mem.nbytes
    for ws, wd in zip(mem.weights, disk.weights):
        assert len(ws) == len(wd) and all(torch.equal(a, wd[i]) for i, a in enumerate(ws))
    levels = next(ws for ws in mem.weights if len(ws) >= 3)
    part = OnDisk(tmp_path / "one.safetensors", levels)
    for level in (0, 1, 0, 1, 2, 1, 0):       # the two levels read last stay in memory
        assert torch.equal(part[level], levels[level])
    assert part.reads == 4                    # 0, 1, then 2 (0 leaves), then 0 again
    extra = [*SMALL, "cache.enabled=false"]
    run(text_job(tmp_path, *extra), tmp_path / "memory")
    run(text_job(tmp_path, *extra, "allocator.database=disk"), tmp_path / "disk")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("memory", "disk"))
    assert b["search"]["database"] == "disk" and a["search"]["levels"] == b["search"]["levels"]
    assert (tmp_path / "memory" / "plan.csv").read_text() == (tmp_path / "disk" / "plan.csv").read_text()
    assert a["pruned"] == b["pruned"] and not (tmp_path / "disk" / "search_levels").exists()


def test_the_pruned_path_database_at_its_own_levels_is_the_final_least_squares_reconstruct(arch):
    """Round 2's levels are refit on the inputs the shape `at` gives each layer, so at `at` they are
    the weights reconstruct=lstsq (two streams, residual drift) gives the same units, layer by layer."""
    import copy

    from prune_lab.reconstruct import Reconstruct
    torch.manual_seed(0)
    model = tiny_model(arch, intermediate=32)
    batches = [tokens(2, 64, seed=s) for s in range(3)]
    views, parts, db = database(model, batches)
    at = np.array([p.top if i % 3 else min(1, p.top) for i, p in enumerate(parts)])
    at[0] = 0                                   # a part left dense: its weights must stay as they were
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = Database(parts)
    Engine("cpu", progress=False).walk(model, batches, LevelBuilder(pruned, 0.01, at=at))
    plan = to_plan(pruned, at, sum(p.removed(int(lv)) * p.unit_cost for p, lv in zip(parts, at)))
    Reconstruct("lstsq", damp=0.01, residual=True)(reference, plan, batches, Engine("cpu", progress=False))
    ref_views = layer_views(reference)
    for i, (p, lv) in enumerate(zip(parts, at)):
        lin = ref_views[p.layer].attn.o if p.kind == "attn" else ref_views[p.layer].mlp.down
        assert torch.allclose(pruned.weights[i][lv], lin.weight, rtol=1e-4, atol=1e-5), (i, p.kind, lv)
        assert len(pruned.weights[i]) == p.top + 1 and pruned.order[i][:p.removed(lv)] == \
            sorted(pruned.order[i][:p.removed(lv)], key=pruned.order[i].index)
    dense_path_differs = any(not torch.allclose(pruned.weights[i][lv], db.weights[i][lv], atol=1e-5)
                             for i, lv in enumerate(at) if lv and parts[i].layer > 0)
    assert dense_path_differs           # a later layer's levels see its pruned predecessors' inputs
    lins = Fitness.linears_of(model, parts)
    for i, lin in enumerate(lins):      # the walk left the model at `at` ...
        assert torch.equal(lin.weight, pruned.weights[i][at[i]])
    assert torch.equal(model.state_dict()[next(k for k in before if "q_proj" in k)],
                       before[next(k for k in before if "q_proj" in k)])


def test_a_second_round_searches_from_the_first_ones_best_on_its_pruned_path_database(tmp_path):
    extra = [*SMALL, "cache.enabled=false", "allocator.database=disk", "allocator.remove_empty_layers=true"]
    run(text_job(tmp_path, *extra, "allocator.rounds=2"), tmp_path / "two")
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    s = m["search"]
    assert m["status"] == "ok" and [set(r) for r in s["rounds"]] == \
        [{"database_seconds", "best_fitness", "kept"}, {"database_seconds", "carried_fitness", "best_fitness", "kept"}]
    assert s["rounds"][1]["kept"] in ("search", "round 1", "error", "relative_error")
    first, second = s["rounds"]
    assert second["best_fitness"] <= second["carried_fitness"] + 1e-12    # round 2 starts from round 1's best
    assert s["best_fitness"] == second["best_fitness"] and len(s["trajectory"]) == 2 * (3 + 1)
    assert not (tmp_path / "two" / "search_levels").exists()
    channel = 3 * 64
    assert abs(m["plan"]["params_removed"] - m["plan"]["target_params"]) <= channel / 2


def test_the_uniform_ladder_holds_every_one_shape_candidate_that_meets_the_budget():
    from prune_lab.allocator.search.uniform import uniform_ladder
    model = tiny_model("qwen2", intermediate=48)          # 2 KV groups of 7 heads, MLP 48, 3 layers
    views = layer_views(model)
    v = views[0]
    target = int(0.3 * sum(x.num_params for x in views))
    parts, candidates = uniform_ladder(views, target, 1)
    assert len(candidates) == 2 and len(parts) == 6                 # 0 or 1 groups removed per layer
    for c in candidates:
        a, m = parts[0].removed(int(c[0])), parts[1].removed(int(c[1]))
        assert (c[0::2] == c[0]).all() and (c[1::2] == c[1]).all()  # one shape in every layer
        removed = 3 * (a * v.attn.group_cost + m * v.mlp.channel_cost)
        over = 3 * (v.mlp.channel_cost if m else v.attn.group_cost)   # attention alone: one group fewer is short
        assert target <= removed < target + over
        assert removed_params(parts, c) == removed
    aligned_parts, aligned = uniform_ladder(views, target, 8)
    assert aligned and all((48 - aligned_parts[1].removed(int(c[1]))) % 8 == 0 for c in aligned)
    with pytest.raises(PruneLabError, match="cannot be met with one shape"):
        uniform_ladder(views, int(0.99 * sum(x.num_params for x in views)), 1)
    with pytest.raises(PruneLabError, match="allocator.shape=uniform gives every layer the same shape"):
        Search(shape="uniform", layer_start=1).eligible(views)


def test_a_uniform_shape_search_scores_every_shape_and_exports_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    extra = [*SMALL, "cache.enabled=false", "allocator.shape=uniform", "output.export=hf", "allocator.rounds=2"]
    run(text_job(tmp_path, *extra), tmp_path / "u")
    m = json.loads((tmp_path / "u" / "metrics.json").read_text())
    s = m["search"]
    assert m["status"] == "ok" and s["searcher"] == "exhaustive" and s["reference"] == "uniform_shape"
    assert len(s["candidates"]) >= 2
    best = min(s["candidates"], key=lambda c: c["fitness"])      # the last round's scores
    assert s["levels"] == {"attn": [best["attn"]] * 3, "mlp": [best["mlp"]] * 3}
    assert m["plan"]["params_removed"] >= m["plan"]["target_params"]
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "u" / "hf").config
    assert (config.num_key_value_heads, config.intermediate_size) == (2 - best["attn"], 48 - best["mlp"])


def droppable_database(model, batches):
    views = layer_views(model)
    parts = ladder(views, 0.125, 1, np.ones(len(views), dtype=bool), droppable=True)
    db = Database(parts)
    Engine("cpu", progress=False).walk(model, batches, LevelBuilder(db, 0.01), propagate="dense")
    return views, parts, db


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_removed_layers_fitness_is_the_kl_of_the_model_without_that_layer(arch):
    import copy
    import torch.nn.functional as F

    from prune_lab.core.executor import apply_plan
    from prune_lab.core.plan import PruningPlan
    model = tiny_model(arch, intermediate=32)
    batches = [tokens(2, 32, seed=s) for s in range(2)]
    views, parts, db = droppable_database(model, batches)
    budget = Budget(parts, 0)
    levels = np.zeros(len(parts), dtype=int)
    assert budget.drop(levels, 2) == [2] and budget.dropped_layers(levels) == []
    assert budget.dropped_blocks(levels, "attn") == [1] and budget.dropped_blocks(levels, "mlp") == []
    assert budget.drop(levels, 3) == [3] and budget.dropped_layers(levels) == [1]
    assert budget.dropped_blocks(levels, "attn") == budget.dropped_blocks(levels, "mlp") == []
    assert db.parts[2].removed(levels[2]) == db.parts[2].units and len(db.weights[2]) == parts[2].top + 2
    got = Fitness(model, db, batches, "kl")(levels)
    short = apply_plan(copy.deepcopy(model), PruningPlan(layers=[1]))     # the layer deleted, a slow reference
    with torch.no_grad():
        ref = sum(float(F.kl_div(F.log_softmax(short(b).logits.float(), -1), F.log_softmax(model(b).logits.float(), -1),
                                 log_target=True, reduction="sum")) for b in batches) / sum(b.numel() for b in batches)
    assert got == pytest.approx(ref, rel=1e-4) and ref > 1e-4
    plan = to_plan(db, levels, sum(v.num_params for v in views if v.index == 1))
    assert plan.layers == [1] and 1 not in plan.attn and 1 not in plan.mlp


def test_mutations_remove_single_parts_and_repairs_bring_one_back_at_its_top_level():
    from prune_lab.allocator.search.evolution import mutate
    model = tiny_model("llama", intermediate=32)
    views = layer_views(model)
    parts = ladder(views, 0.125, 1, np.ones(len(views), dtype=bool), droppable=True)
    budget = Budget(parts, int(0.45 * sum(v.num_params for v in views)))
    rng = np.random.default_rng(0)
    parent = budget.repair(budget.project(np.ones(len(parts))), rng)
    seen = {"attn": 0, "mlp": 0, "layer": 0}
    for _ in range(300):
        child = mutate(parent, budget, rng, 2)
        assert budget.feasible(child) and (child <= budget.top + 1).all()
        gone = child > budget.top
        seen["attn"] += bool((gone[0::2] & ~gone[1::2]).any())     # attention only
        seen["mlp"] += bool((gone[1::2] & ~gone[0::2]).any())      # MLP only
        seen["layer"] += bool((gone[0::2] & gone[1::2]).any())
        parent = child if rng.random() < 0.5 else parent
    assert min(seen.values()) > 0, seen
    levels = budget.top.copy()
    budget.drop(levels, 0)
    budget.drop(levels, 1)
    budget.restore(levels, 1)                                      # the MLP back, the attention still gone
    assert levels[0] == parts[0].drop and levels[1] == budget.top[1]
    no_drop = Budget(ladder(views, 0.125, 1, np.ones(len(views), dtype=bool)), budget.target)
    assert not len(no_drop.droppable_parts(np.zeros(len(parts), dtype=int)))


def test_an_attention_that_cannot_run_without_heads_goes_only_with_its_layer():
    from prune_lab.allocator.search.evolution import mutate
    model = tiny_model("opt", intermediate=32)
    views = layer_views(model)
    parts = ladder(views, 0.125, 1, np.ones(len(views), dtype=bool), droppable=True)
    assert [p.alone for p in parts[:2]] == [False, True]
    budget = Budget(parts, int(0.45 * sum(v.num_params for v in views)))
    levels = np.zeros(len(parts), dtype=int)
    assert budget.drop(levels, 0) == [0, 1]                        # OPT's attention takes its MLP along
    budget.restore(levels, 1)
    assert (levels[:2] == budget.top[:2]).all()                    # and comes back with it
    rng = np.random.default_rng(1)
    parent = budget.repair(budget.project(np.ones(len(parts))), rng)
    for _ in range(200):
        child = mutate(parent, budget, rng, 2)
        gone = child > budget.top
        assert not (gone[0::2] & ~gone[1::2]).any()                # never an attention alone
        parent = child if rng.random() < 0.5 else parent


def test_a_dropped_attentions_fitness_is_the_kl_of_the_model_with_that_block_emptied():
    import copy
    import torch.nn.functional as F

    from prune_lab.core.executor import apply_plan
    from prune_lab.core.plan import PruningPlan
    model = tiny_model("llama", intermediate=32)
    batches = [tokens(2, 32, seed=s) for s in range(2)]
    views, parts, db = droppable_database(model, batches)
    budget = Budget(parts, 0)
    levels = np.zeros(len(parts), dtype=int)
    budget.drop(levels, 2)                                         # layer 1's attention
    budget.drop(levels, 5)                                         # layer 2's MLP
    got = Fitness(model, db, batches, "kl")(levels)
    plan = to_plan(db, levels, views[1].attn.num_params + views[2].mlp.num_params)
    assert plan.attn_blocks == [1] and plan.mlp_blocks == [2] and not plan.layers and not plan.attn and not plan.mlp
    short = apply_plan(copy.deepcopy(model), plan)                 # 0 heads / width 0, a slow reference
    with torch.no_grad():
        ref = sum(float(F.kl_div(F.log_softmax(short(b).logits.float(), -1), F.log_softmax(model(b).logits.float(), -1),
                                 log_target=True, reduction="sum")) for b in batches) / sum(b.numel() for b in batches)
    assert got == pytest.approx(ref, rel=1e-4) and ref > 1e-4


def test_a_search_that_empties_an_attention_runs_end_to_end_deterministically(tmp_path, monkeypatch):
    """remove_empty_layers=true with a fitness that rewards layer 1 without attention (its MLP kept): the
    job's plan empties that attention only, reconstructs, verifies, saves and reloads to the same logits."""
    from prune_lab import load_pruned
    from prune_lab.allocator import search as search_module
    from prune_lab.core.plan import PruningPlan

    class Rewarding(search_module.Fitness):
        def __call__(self, levels, which=None):
            attn, mlp = self.db.parts[2], self.db.parts[3]
            bonus = 10.0 if levels[2] > attn.top and levels[3] <= mlp.top else 0.0
            return super().__call__(levels, which) - bonus

    monkeypatch.setattr(search_module, "Fitness", Rewarding)
    extra = [*SMALL, "allocator.remove_empty_layers=true", "allocator.generations=8", "allocator.offspring=8",
             "cache.enabled=false", "verify=true", "output.save_model=true"]
    run(text_job(tmp_path, *extra), tmp_path / "a")
    run(text_job(tmp_path, *extra), tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert a["status"] == "ok" and a["verify"]["passed"]
    assert (tmp_path / "a" / "plan.csv").read_text() == (tmp_path / "b" / "plan.csv").read_text()
    assert a["search"]["attn_blocks_removed"] == [1] and 1 not in a["search"]["layers_removed"]
    assert a["plan"]["attn_blocks_removed"] == [1] and 1 not in a["plan"]["mlp_blocks_removed"]
    plan = PruningPlan.load(tmp_path / "a" / "plan.csv")
    assert plan.attn_blocks == [1] and 1 not in plan.attn
    channel = 3 * 64
    assert abs(a["plan"]["params_removed"] - a["plan"]["target_params"]) <= channel / 2
    layers = json.loads((tmp_path / "a" / "layers.json").read_text())["layers"]
    assert layers[1]["attn_removed"] and layers[1]["attn_rate"] == 1.0 and not layers[1]["removed"]
    reloaded = load_pruned(tmp_path / "a" / "model")
    assert reloaded.config.prune_lab["layers"][1]["q_heads"] == 0


def test_a_search_result_worse_than_a_seed_on_every_fitness_window_gives_way_to_the_seed(monkeypatch):
    """The stages score candidates on a few windows each: the round's result is checked against the
    seeds on all of them, and the better one kept (the search's on a tie)."""
    calls = []

    def fitness(levels, which=None):
        calls.append(which)
        return float(np.asarray(levels).sum())

    search = Search()
    seeds = [np.array([2, 2]), np.array([1, 1])]
    monkeypatch.setattr(search, "_searcher", lambda *a: np.array([3, 0]))
    best, kept = search._run(fitness, None, seeds, ["global", "uniform"], [1], None, [], None, 1)
    assert (best == [1, 1]).all() and kept == "uniform" and calls == [None, None, None]
    monkeypatch.setattr(search, "_searcher", lambda *a: np.array([2, 0]))
    best, kept = search._run(fitness, None, seeds, ["global", "uniform"], [1], None, [], None, 1)
    assert (best == [2, 0]).all() and kept == "search"


@pytest.mark.parametrize("kwargs,match", [
    ({"generations": 0}, "allocator.generations must be a whole number >= 1"),
    ({"mlp_step": 0.7}, r"allocator.mlp_step must be in \(0, 0.5\]"),
    ({"searcher": "annealing"}, "allocator.searcher must be one of evolution, optuna"),
    ({"fitness": "bleu"}, "allocator.fitness must be one of kl, ppl"),
    ({"database": "ram"}, "allocator.database must be one of memory, disk"),
    ({"mutations": 0}, "allocator.mutations must be a whole number >= 1"),
    ({"rounds": 0}, "allocator.rounds must be a whole number >= 1"),
    ({"shape": "ragged"}, "allocator.shape must be one of free, uniform"),
    ({"remove_empty_layers": True, "searcher": "optuna"}, "allocator.remove_empty_layers=true removes layers by the"),
])
def test_bad_search_settings_fail_when_the_allocator_is_built(kwargs, match):
    with pytest.raises(PruneLabError, match=match):
        Search(**kwargs)


@pytest.mark.parametrize("overrides,line", [
    (["allocator=search"], "allocator.fitness_tokens=8192 is more than the calibration set's 128 tokens: "
     "lower it or raise calibration.n_samples"),
    (["allocator=search", "allocator.fitness_tokens=64", "allocator.ratio=0.99"],
     "allocator.ratio=0.99 cannot be met on the ladder"),
])
def test_search_bad_input_is_one_line_before_the_database(tmp_path, overrides, line):
    proc = run_cli(*tiny_overrides("llama"), *overrides, run_dir=tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"prune_lab: error: {line}"), errors
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and "score" not in m["timings_s"] and "search" not in m["timings_s"]


def _counting_fitness():
    class Counting:                 # fitness = distance to a target shape, counting calls per stage
        evaluations = tokens = 0

        def __init__(self):
            self.calls = []

        def __call__(self, levels, which=None):
            self.calls.append(which if which is None or isinstance(which, int) else tuple(int(b) for b in which))
            self.evaluations += 1
            return float(np.abs(levels - 1).sum())

        def anchor(self, levels):
            self.calls.append("anchor")
    return Counting()


def _six_layer_budget():
    model = tiny_model("llama", layers=6, intermediate=96)      # enough distinct children per generation
    parts = ladder(layer_views(model), 0.0625, 1, np.ones(6, dtype=bool))
    return parts, Budget(parts, int(0.2 * sum(v.num_params for v in layer_views(model))))


def test_each_selection_stage_evaluates_a_quarter_of_the_one_before():
    from prune_lab.allocator.search.evolution import evolve, stage_survivors
    assert stage_survivors(16, 3) == [16, 4, 1] and stage_survivors(4, 2) == [4, 1]
    parts, budget = _six_layer_budget()
    rng = np.random.default_rng(0)
    f = _counting_fitness()
    seed = budget.repair(np.zeros(len(parts), dtype=int), rng)
    evolve(f, budget, [seed], [1, 4, 16], generations=2, offspring=16, rng=rng, trajectory=[])
    stages = [c for c in f.calls if c != "anchor"]
    # fixed windows: the first n of each stage; the parent joins the last stage (elitist)
    assert stages == [16] + 2 * ([1] * 16 + [4] * 4 + [16] * 2)
    assert f.calls[:2] == [16, "anchor"]            # the parent is the anchor before its children run


def test_resampled_stages_draw_distinct_windows_from_the_pool_and_score_the_parent_beside_the_survivor():
    from prune_lab.allocator.search.evolution import evolve
    parts, budget = _six_layer_budget()
    rng = np.random.default_rng(0)
    f = _counting_fitness()
    seed = budget.repair(np.zeros(len(parts), dtype=int), rng)
    trajectory = []
    evolve(f, budget, [seed], [1, 2, 4], generations=3, offspring=16, rng=rng, trajectory=trajectory,
           mutations=3, pool=8)
    stages = [c for c in f.calls[1:] if c != "anchor"]
    assert len(stages) == 3 * (16 + 4 + 2)
    sizes = [len(c) for c in stages]
    assert sizes == 3 * ([1] * 16 + [2] * 4 + [4] * 2)
    assert all(len(set(c)) == len(c) and all(0 <= b < 8 for b in c) for c in stages)
    finals = [c for c in stages if len(c) == 4]
    assert all(finals[2 * g] == finals[2 * g + 1] for g in range(3))     # parent and survivor: same windows
    assert len(set(finals)) > 1                                          # drawn anew each generation
    values = [v for _, _, v in trajectory]
    assert all(b <= a for a, b in zip(values, values[1:]))              # a deterministic fitness never rises


def test_a_child_raises_one_to_mutations_parts_and_stays_within_the_budget():
    from prune_lab.allocator.search.evolution import mutate, n_flips
    parts, budget = _six_layer_budget()
    rng = np.random.default_rng(0)
    draws = [n_flips(rng, 3) for _ in range(3000)]
    share = np.bincount(draws, minlength=4)[1:] / len(draws)
    assert share == pytest.approx([5 / 9, 3 / 9, 1 / 9], abs=0.03)   # min of two uniform draws in 1..3
    assert set(n_flips(rng, 1) for _ in range(20)) == {1}
    parent = budget.repair(np.zeros(len(parts), dtype=int), rng)
    for flips in (1, 2, 3):
        for _ in range(20):
            child = mutate(parent, budget, rng, flips)
            assert budget.feasible(child) and not np.array_equal(child, parent)
            assert 1 <= (child > parent).sum() and (child - parent).max() <= flips
