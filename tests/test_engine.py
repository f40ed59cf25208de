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

    needs_gram, needs_cross, needs_residual = True, False, False

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

    def __init__(self, cross: bool):
        super().__init__()
        self.needs_cross = cross

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


def _hooked_inputs(model, batches, index, lin_of):
    xs = []
    h = lin_of(layer_views(model)[index]).register_forward_hook(lambda _m, i, _o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(xs)


def test_two_streams_give_the_cross_gram_of_dense_and_pruned_inputs():
    """Layer 2's down_proj: Gram on the pruned model, cross-Gram with the dense model's inputs."""
    dense = lively(tiny_model("llama"))
    model = copy.deepcopy(dense)
    batches = [tokens(2, 16, seed=3), tokens(2, 16, seed=4)]
    method = ZeroColumns(cross=True)
    with torch.no_grad():
        _, hidden = walk(model, batches, method, progress=False, return_hidden=True)
    # `model` now carries the zeroed columns: its plain forward is the pruned path
    x_dense = _hooked_inputs(dense, batches, 2, lambda v: v.mlp.down)
    x_pruned = _hooked_inputs(model, batches, 2, lambda v: v.mlp.down)
    s = method.seen[(2, "mlp.down")]
    torch.testing.assert_close(s.gram, x_pruned.T @ x_pruned, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(s.cross, x_dense.T @ x_pruned, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(s.dense_gram, x_dense.T @ x_dense, atol=1e-3, rtol=1e-4)
    assert (s.cross - s.gram).abs().max() > 1e-2          # the streams really differ
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
