"""Layer-sequential engine: exact replay of the model, statistics against slow references, two streams."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import ALL_ARCHS, left_padded, lively, tiny_model, tokens
from prune_lab.core.adapter import layer_views
from prune_lab.engine import InputStats, walk
from prune_lab.errors import PruneLabError


class Observe:
    """Changes nothing; keeps the stats it was handed."""

    needs_gram, needs_cross, needs_residual, needs_dense_grams = True, False, False, False

    def __init__(self, stages=(("attn.o",), ("mlp.down",))):
        self._stages = [list(s) for s in stages]
        self.seen: dict[tuple[int, str], InputStats] = {}

    def stages(self, view):
        return self._stages

    def apply(self, index, view, stats):
        for path, s in stats.items():
            self.seen[(index, path)] = s
        return {"paths": sorted(stats)}


class ZeroColumns(Observe):
    """Zeroes a few o_proj / down_proj input columns (a masked prune), optionally asking for two streams."""

    def __init__(self, cross: bool, dense_grams: bool = False):
        super().__init__()
        self.needs_cross, self.needs_dense_grams = cross, dense_grams

    def apply(self, index, view, stats):
        rec = super().apply(index, view, stats)
        for path in stats:
            lin = view.attn.o if path == "attn.o" else view.mlp.down
            lin.weight[:, : lin.in_features // 4] = 0
        return rec


def padded_batches(arch_vocab=8192):
    a, mask_a = left_padded(tokens(2, 20, seed=1), [0, 7])
    b = tokens(2, 20, seed=2)
    return [{"input_ids": a, "attention_mask": mask_a}, {"input_ids": b, "attention_mask": torch.ones_like(b)}]


def final_logits(model, hidden):
    norm = model.model.decoder.final_layer_norm if model.config.model_type == "opt" else model.model.norm
    return [model.lm_head(norm(h)) for h in hidden]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_walking_the_unmodified_model_reproduces_its_logits(arch, impl):
    model = lively(tiny_model(arch, attn_implementation=impl))
    batches = padded_batches()
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
        records, hidden = walk(model, batches, Observe(), progress=False, return_hidden=True)
        got = final_logits(model, hidden)
    assert [r["layer"] for r in records] == [0, 1, 2]
    for e, g, b in zip(expected, got, batches):
        keep = b["attention_mask"].bool()
        assert (e[keep] - g[keep]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stats_match_a_hooked_forward_without_padding(arch):
    """Sums, Gram and counts of every stage's inputs equal a plain forward's hooked inputs on real tokens."""
    model = lively(tiny_model(arch, attn_implementation="eager"))
    batches = padded_batches()
    method = Observe(stages=[["attn.q", "attn.k", "attn.v"], ["attn.o"], ["mlp.gate", "mlp.up"], ["mlp.down"]])
    ref: dict = {}
    views = layer_views(model)
    handles = []
    current = {}
    for v in views:
        for path, lin in (("attn.q", v.attn.q), ("attn.o", v.attn.o), ("mlp.up", v.mlp.up), ("mlp.down", v.mlp.down)):
            def hook(_m, inp, _o, key=(v.index, path)):
                x = inp[0].reshape(-1, inp[0].shape[-1])[current["mask"].reshape(-1)]
                ref.setdefault(key, []).append(x)
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    walk(model, batches, method, progress=False, offload=True)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    for key, xs in ref.items():
        x = torch.cat(xs)
        s = method.seen[key]
        assert s.count == n_real == x.shape[0]
        torch.testing.assert_close(s.sum, x.sum(0), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(s.gram, x.T @ x, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(s.var, x.var(0, unbiased=False), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s.mean_abs, x.abs().mean(0), atol=1e-5, rtol=1e-5)
    for i in range(3):       # one accumulator per distinct input: q/k/v and gate/up are handed the same tensors
        q, up = method.seen[(i, "attn.q")], method.seen[(i, "mlp.up")]
        assert all(method.seen[(i, p)].gram is q.gram and method.seen[(i, p)].sum is q.sum for p in ("attn.k", "attn.v"))
        assert method.seen[(i, "mlp.gate")].gram is up.gram


def _hooked_inputs(model, batches, index, lin_of):
    xs = []
    h = lin_of(layer_views(model)[index]).register_forward_hook(lambda _m, i, _o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(xs)


@pytest.mark.parametrize("dense_grams", [False, True])
def test_two_streams_give_the_cross_gram_of_dense_and_pruned_inputs(dense_grams):
    """Layer 2's down_proj: Gram on the pruned model; of the dense model's inputs X the products a refit
    reads, W₀·C = W₀ X X~ᵀ and ||W₀ X||² (and the full C, D with needs_dense_grams)."""
    dense = lively(tiny_model("llama"))
    model = copy.deepcopy(dense)
    batches = [tokens(2, 16, seed=3), tokens(2, 16, seed=4)]
    method = ZeroColumns(cross=True, dense_grams=dense_grams)
    with torch.no_grad():
        _, hidden = walk(model, batches, method, progress=False, return_hidden=True)
    # `model` now carries the zeroed columns: its plain forward is the pruned path
    x_dense = _hooked_inputs(dense, batches, 2, lambda v: v.mlp.down)
    x_pruned = _hooked_inputs(model, batches, 2, lambda v: v.mlp.down)
    w0 = layer_views(dense)[2].mlp.down.weight
    s = method.seen[(2, "mlp.down")]
    torch.testing.assert_close(s.gram, x_pruned.T @ x_pruned, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(s.w_cross(w0).float(), w0 @ x_dense.T @ x_pruned, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(s.w_energy(w0).float(), (x_dense @ w0.T).square().sum(), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(s.dense_sum, x_dense.sum(0), atol=1e-4, rtol=1e-5)
    if dense_grams:
        torch.testing.assert_close(s.cross, x_dense.T @ x_pruned, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(s.dense_gram, x_dense.T @ x_dense, atol=1e-3, rtol=1e-4)
    else:                    # (C itself is kept where it is cheaper than W₀·C: here out 64 > in 48)
        assert s.dense_gram is None
    assert (s.w_cross(w0) - w0.double() @ s.gram.double()).abs().max() > 1e-2    # the streams really differ
    with torch.no_grad():
        expected = [model(b).logits for b in batches]
    for e, g in zip(expected, final_logits(model, hidden)):
        assert (e - g).abs().max().item() <= 1e-5


def test_propagate_dense_feeds_every_layer_the_dense_outputs():
    dense = lively(tiny_model("mistral"))
    model = copy.deepcopy(dense)
    batches = [tokens(2, 16, seed=5)]
    with torch.no_grad():
        _, hidden = walk(model, batches, ZeroColumns(cross=False), propagate="dense", progress=False,
                         return_hidden=True)
        expected = dense(batches[0]).logits
        changed = model(batches[0]).logits
    got = final_logits(model, hidden)[0]
    assert (expected - got).abs().max().item() <= 1e-5
    assert (changed - got).abs().max().item() > 1e-2


def test_bad_propagate_and_unknown_linear_raise():
    model = tiny_model("llama")
    with pytest.raises(PruneLabError, match="propagate"):
        walk(model, [tokens()], Observe(), propagate="sideways", progress=False)
    with pytest.raises(PruneLabError, match="unknown linear"):
        walk(model, [tokens()], Observe(stages=[["attn.x"]]), progress=False)


def _count_forwards(model):
    """Forward hooks on every decoder layer (a deepcopy of a layer carries its hook: the dense copy counts)."""
    counts = {}

    def hook(mod, _inp, _out, i=None):
        counts[i] = counts.get(i, 0) + 1
    handles = [v.module.register_forward_hook(lambda m, a, o, i=v.index: hook(m, a, o, i)) for v in layer_views(model)]
    return counts, handles


def _plan_refit(plan):
    from prune_lab.reconstruct import PlanRefit
    return PlanRefit(plan, "obs", 0.01, False, 0, residual=True)


@pytest.mark.parametrize("case,expected", [
    # two streams, stages [attn.o], [mlp.down]: layer 0 sees one stream (the dense copy never runs), later
    # layers run it once; the pruned layer once per stage; down_proj's change is replayed (no extra pass)
    ("obs attn+mlp", [2, 3, 3]),
    ("obs mlp", [1, 2, 2]),
    ("obs layer 1 untouched", [1, 2, 2]),    # layer 1: nothing to refit, both streams forward once each
    ("sparsegpt", [2, 3, 3]),                # one stage of all linears, then the modified layer again
    ("sparsegpt symmetric", [2, 2, 2]),
    ("sparsegpt true sequential", [4, 5, 5]),
    ("wanda", [2, 2, 2]),
    ("propagate dense", [1, 1, 1]),
])
def test_layer_forwards_per_batch_are_the_minimum(case, expected):
    from prune_lab.method import SparseGPT, Wanda
    from prune_lab.core.plan import PruningPlan
    model = lively(tiny_model("llama"))
    mlp = {i: [0, 5, 7] for i in range(3)}
    methods = {"obs attn+mlp": lambda: _plan_refit(PruningPlan(attn={i: [1] for i in range(3)}, mlp=mlp)),
               "obs mlp": lambda: _plan_refit(PruningPlan(mlp=mlp)),
               "obs layer 1 untouched": lambda: _plan_refit(PruningPlan(mlp={0: [1], 2: [3]})),
               "sparsegpt": lambda: SparseGPT(sparsity=0.5, blocksize=16),
               "sparsegpt symmetric": lambda: SparseGPT(sparsity=0.5, blocksize=16, asymmetric=0.0, residual=False),
               "sparsegpt true sequential": lambda: SparseGPT(sparsity=0.5, blocksize=16, true_sequential=True),
               "wanda": lambda: Wanda(sparsity=0.5),
               "propagate dense": lambda: Observe(stages=[["attn.o", "mlp.down"]])}   # importance=obs, flap
    batches = [tokens(2, 24, seed=s) for s in range(3)]
    counts, handles = _count_forwards(model)
    try:
        records = walk(model, batches, methods[case](), progress=False,
                       propagate="dense" if case == "propagate dense" else "pruned")
    finally:
        for h in handles:
            h.remove()
    assert [counts[i] / len(batches) for i in range(3)] == expected
    assert [r["forwards"] for r in records] == expected


@pytest.mark.parametrize("breaks", [False, True])
def test_replayed_outputs_equal_a_fresh_forward(breaks, monkeypatch):
    """The next layer's inputs from the replayed down_proj change equal those of running the modified
    layer (within round-off); a layer whose output is not h + down(x) (here: scaled by a hook) is run."""
    import prune_lab.engine.layer as engine
    from prune_lab.core.plan import PruningPlan
    plan = PruningPlan(attn={1: [0]}, mlp={i: [0, 5, 7, 11] for i in range(3)})
    batches = [tokens(2, 24, seed=s) for s in range(3)]
    hidden = {}
    for budget in (engine.REPLAY_BYTES, 0):
        monkeypatch.setattr(engine, "REPLAY_BYTES", budget)
        model = lively(tiny_model("qwen3"))
        if breaks:
            layer_views(model)[1].module.register_forward_hook(lambda _m, _i, o: o * 1.5)
        records, hidden[budget] = walk(model, batches, _plan_refit(plan), progress=False, return_hidden=True)
        with torch.no_grad():
            expected = [model(b).logits for b in batches]
        got = final_logits(model, hidden[budget])
        assert all((e - g).abs().max() <= 1e-5 for e, g in zip(expected, got))
        if budget:
            assert [r["forwards"] for r in records] == ([1, 4, 2] if breaks else [1, 3, 2])
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(*hidden.values()))


def test_bfloat16_two_streams_take_w0_x_in_fp32():
    """A bf16 model: W₀·C of down_proj (two streams) from W₀x recomputed in fp32, close to the product of
    the hooked bf16 inputs in float64 (the pruned inputs differ by bf16 rounding of the replayed stream)."""
    dense = lively(tiny_model("llama", intermediate=160)).to(torch.bfloat16)   # 2 x 64 outputs < 160: Σ (W₀x) x~ᵀ
    model = copy.deepcopy(dense)
    batches = [tokens(2, 16, seed=3), tokens(2, 16, seed=4)]
    method = ZeroColumns(cross=True)
    with torch.no_grad():
        walk(model, batches, method, progress=False)
    x_dense = _hooked_inputs(dense, batches, 2, lambda v: v.mlp.down).double()
    x_pruned = _hooked_inputs(model, batches, 2, lambda v: v.mlp.down).double()
    w0 = layer_views(dense)[2].mlp.down.weight.detach()
    s = method.seen[(2, "mlp.down")]
    assert s.cross is None and s.target is not None
    expected = w0.double() @ x_dense.T @ x_pruned
    assert (s.w_cross(w0) - expected).norm() <= 2e-2 * expected.norm()
    assert float(s.w_energy(w0)) == pytest.approx(float((x_dense @ w0.double().T).square().sum()), rel=1e-2)


def test_after_its_last_attention_change_a_layer_reuses_its_attention():
    """Stages [attn.o], [mlp.down]: the down_proj pass runs attention as o_proj on the kept o_proj inputs
    (AttentionStandIn), so attention runs once per stream per layer (layer 0: one stream), and the results
    equal those of running it, within the replay's round-off (REPLAY_BYTES = 0 turns reuse and replay off)."""
    import prune_lab.engine.layer as engine
    from prune_lab.core.plan import PruningPlan
    plan = PruningPlan(attn={i: [1] for i in range(3)}, mlp={i: [0, 5, 7] for i in range(3)})
    batches = [tokens(2, 24, seed=s) for s in range(3)]
    weights = {}
    for budget in (engine.REPLAY_BYTES, 0):
        engine_budget, engine.REPLAY_BYTES = engine.REPLAY_BYTES, budget
        model, calls = lively(tiny_model("mistral")), {}
        for v in layer_views(model):
            v.module.self_attn.register_forward_hook(lambda *_, i=v.index: calls.__setitem__(i, calls.get(i, 0) + 1))
        try:
            walk(model, batches, _plan_refit(plan), progress=False)
        finally:
            engine.REPLAY_BYTES = engine_budget
        weights[budget] = [p.detach().clone() for p in model.parameters()]
        assert [calls[i] / len(batches) for i in range(3)] == ([1, 2, 2] if budget else [3, 4, 4])   # (no replay)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(*weights.values()))   # replay: round-off
