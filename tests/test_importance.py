"""Unit importance criteria against brute-force per-unit computations written out in the test."""
from __future__ import annotations

import pytest
import torch

from conftest import lively, tiny_model, tokens
from prune_lab.core.adapter import layer_views
from prune_lab.artifacts.scores import load_scores, save_scores
from prune_lab.importance import Magnitude, Random, Taylor, Wanda

BATCHES = [tokens(2, 12, seed=s) for s in (1, 2, 3)]


def unit_slices(view):
    """Per KV group: [(param, index)] of its rows/columns; per MLP channel the same (explicit, no reshapes)."""
    a, m = view.attn, view.mlp
    g, hd = a.group_size, a.head_dim
    groups = []
    for j in range(a.num_kv_heads):
        q, kv = slice(j * g * hd, (j + 1) * g * hd), slice(j * hd, (j + 1) * hd)
        parts = [(a.q.weight, (q, slice(None))), (a.k.weight, (kv, slice(None))),
                 (a.v.weight, (kv, slice(None))), (a.o.weight, (slice(None), q))]
        parts += [(lin.bias, (rows,)) for lin, rows in ((a.q, q), (a.k, kv), (a.v, kv)) if lin.bias is not None]
        groups.append(parts)
    channels = [[(m.gate.weight, (c, slice(None))), (m.up.weight, (c, slice(None))),
                 (m.down.weight, (slice(None), c))] for c in range(m.width)]
    return groups, channels


def brute_force(model, per_weight) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sum per_weight(param)[rows/cols] over every unit, unit by unit."""
    attn, mlp = [], []
    for view in layer_views(model):
        groups, channels = unit_slices(view)
        attn.append(torch.stack([sum(per_weight(p)[idx].sum() for p, idx in u) for u in groups]))
        mlp.append(torch.stack([sum(per_weight(p)[idx].sum() for p, idx in u) for u in channels]))
    return attn, mlp


def batch_gradients(model) -> list[dict]:
    """Plain autograd, one batch at a time: {param: grad} per batch."""
    grads = []
    for b in BATCHES:
        model.zero_grad()
        model(b, labels=b).loss.backward()
        grads.append({p: p.grad.detach().clone() for p in model.parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return grads


def assert_scores_close(scores, expected, rtol=1e-4):
    for got, want in zip(scores.attn + scores.mlp, expected[0] + expected[1]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.float(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_taylor_matches_brute_force(arch):
    model = lively(tiny_model(arch, layers=2))
    grads = batch_gradients(model)
    mean_grad = {p: sum(g[p] for g in grads) / len(grads) for p in grads[0]}
    first = brute_force(model, lambda p: (p.detach() * mean_grad[p]).abs())
    scores = Taylor()(model, BATCHES)
    assert_scores_close(scores, first)

    fisher = brute_force(model, lambda p: sum((p.detach() * g[p]) ** 2 for g in grads) / len(grads))
    second = Taylor(second_order=True)(model, BATCHES)
    assert_scores_close(second, ([f + 0.5 * s for f, s in zip(first[0], fisher[0])],
                                 [f + 0.5 * s for f, s in zip(first[1], fisher[1])]))
    for s2, s1 in zip(second.attn + second.mlp, scores.attn + scores.mlp):
        assert (s2 > s1).all()                                     # the added term is positive


def test_taylor_uses_one_backward_per_batch_and_restores_the_model(monkeypatch):
    model = lively(tiny_model("qwen3", layers=3))
    model.model.embed_tokens.weight.requires_grad_(False)
    calls = {"forward": 0, "backward": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    original = torch.Tensor.backward

    def counting_backward(self, *args, **kwargs):
        calls["backward"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    model.train()
    Taylor(second_order=True)(model, BATCHES)
    assert calls == {"forward": len(BATCHES), "backward": len(BATCHES)}
    assert model.training and not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_wanda_equals_weight_times_input_norm_for_one_layer():
    model = lively(tiny_model("qwen2", layers=2))
    view = layer_views(model)[1]
    linears = {"q": view.attn.q, "k": view.attn.k, "v": view.attn.v, "o": view.attn.o,
               "gate": view.mlp.gate, "up": view.mlp.up, "down": view.mlp.down}
    inputs = {name: [] for name in linears}
    hooks = [lin.register_forward_hook(lambda _m, args, _o, name=name: inputs[name].append(args[0].detach()))
             for name, lin in linears.items()]
    with torch.no_grad():
        for b in BATCHES:
            model(b)
    for h in hooks:
        h.remove()
    norm = {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).norm(dim=0) for name, xs in inputs.items()}
    n_tokens = sum(b.numel() for b in BATCHES)
    scaled = {lin.weight: lin.weight.detach().abs() * norm[name] for name, lin in linears.items()}
    scaled |= {lin.bias: lin.bias.detach().abs() * n_tokens ** 0.5
               for lin in linears.values() if lin.bias is not None}
    groups, channels = unit_slices(view)
    expected_attn = torch.stack([sum(scaled[p][idx].sum() for p, idx in u) for u in groups])
    expected_mlp = torch.stack([sum(scaled[p][idx].sum() for p, idx in u) for u in channels])
    scores = Wanda()(model, BATCHES)
    torch.testing.assert_close(scores.attn[1], expected_attn, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.mlp[1], expected_mlp, rtol=1e-4, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_magnitude_is_the_l1_norm_of_the_unit(arch):
    model = lively(tiny_model(arch, layers=2))
    assert_scores_close(Magnitude()(model), brute_force(model, lambda p: p.detach().abs()), rtol=1e-5)


def test_random_is_deterministic_per_seed():
    model = tiny_model("llama", layers=3)
    a, b, c = Random()(model, seed=3), Random()(model, seed=3), Random()(model, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.attn + a.mlp, b.attn + b.mlp))
    assert not all(torch.equal(x, y) for x, y in zip(a.attn + a.mlp, c.attn + c.mlp))
    assert [len(s) for s in a.attn] == [2, 2, 2] and [len(s) for s in a.mlp] == [48, 48, 48]


def test_unit_scores_round_trip_through_safetensors(tmp_path):
    scores = Random()(tiny_model("qwen3", layers=2), seed=1)
    save_scores(tmp_path / "scores.safetensors", scores)
    loaded = load_scores(tmp_path / "scores.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(scores.attn + scores.mlp, loaded.attn + loaded.mlp))
    assert len(loaded.attn) == len(loaded.mlp) == 2
