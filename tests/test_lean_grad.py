"""Memory-lean Taylor scoring: streaming hooks, CPU offload and gradient checkpointing give the
scores (and so the plans) of the plain keep-every-gradient computation written out here."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_ARCHS, compose_job, lively, tiny_model, tokens
from prune_lab.core.adapter import layer_views
from prune_lab.allocator import Global
from prune_lab.importance import gradients
from prune_lab.importance.gradients import GradientStatistics
from prune_lab.importance import Taylor
from prune_lab.recipes.common import build

BATCHES = [tokens(2, 12, seed=s) for s in (1, 2, 3)]


def reference_taylor(model, batches, second_order: bool):
    """The straightforward computation: full backward, every .grad kept, summed afterwards."""
    views = layer_views(model)
    linears = [lin for v in views for lin in (v.attn.q, v.attn.k, v.attn.v, v.attn.o,
                                               *v.mlp.inputs, v.mlp.down)]
    params = [p for lin in linears for p in lin.parameters()]
    for p in model.parameters():
        p.requires_grad_(p in set(params))
    grad_sum = {p: torch.zeros_like(p) for p in params}
    fisher = {p: torch.zeros_like(p) for p in params}
    for b in batches:
        model(b, labels=b).loss.backward()
        for p in params:
            grad_sum[p] += p.grad
            fisher[p] += (p.detach() * p.grad) ** 2
        model.zero_grad(set_to_none=True)
    n = len(batches)
    out = []
    for v in views:
        a, m = v.attn, v.mlp
        per = {p: (p.detach() * grad_sum[p] / n).abs() + (0.5 * fisher[p] / n if second_order else 0)
               for p in params}
        rows = lambda p: per[p].reshape(a.num_kv_heads, -1).sum(1)    # noqa: E731
        attn = sum(rows(lin.weight) + (rows(lin.bias) if lin.bias is not None else 0)
                   for lin in (a.q, a.k, a.v)) + per[a.o.weight].sum(0).reshape(a.num_kv_heads, -1).sum(1)
        mlp = sum(per[lin.weight].sum(1) + (per[lin.bias] if lin.bias is not None else 0) for lin in m.inputs)
        mlp = mlp + per[m.down.weight].sum(0)
        out.append((attn, mlp))
    for p in model.parameters():
        p.requires_grad_(True)
    return out


MODES = {"default": {}, "offload": {"offload": True}, "checkpointing": {"gradient_checkpointing": True},
         "lean": {"offload": True, "gradient_checkpointing": True}}


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("second_order", [False, True], ids=["taylor", "taylor_2nd"])
def test_every_mode_gives_the_reference_scores_and_plan(arch, second_order):
    model = lively(tiny_model(arch, layers=3))
    expected = reference_taylor(model, BATCHES, second_order)
    views = layer_views(model)
    plans = {}
    for mode, options in MODES.items():
        scores = Taylor(second_order=second_order, **options)(model, BATCHES)
        for (attn, mlp), got_a, got_m in zip(expected, scores.attn, scores.mlp):
            torch.testing.assert_close(got_a, attn, rtol=1e-5, atol=1e-8, msg=mode)
            torch.testing.assert_close(got_m, mlp, rtol=1e-5, atol=1e-8, msg=mode)
        plan = Global(ratio=0.3)(scores, views)
        plans[mode] = (plan.attn, plan.mlp)
    assert all(p == plans["default"] for p in plans.values())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_cpu_row_blocks_give_the_reference_scores(arch, monkeypatch):
    """On CPU the hooks work in row blocks; blocks that do not divide the layers change nothing."""
    monkeypatch.setattr(gradients, "CPU_BLOCK", 200)          # 1-4 rows per block on these widths
    model = lively(tiny_model(arch, layers=2))
    assert len(gradients.row_blocks(model.model.layers[0].mlp.down_proj.weight
                                    if arch != "opt" else model.model.decoder.layers[0].fc2.weight)) > 10
    for second_order in (False, True):
        expected = reference_taylor(model, BATCHES, second_order)
        for options in ({}, {"offload": True}):
            scores = Taylor(second_order=second_order, **options)(model, BATCHES)
            for (attn, mlp), got_a, got_m in zip(expected, scores.attn, scores.mlp):
                torch.testing.assert_close(got_a, attn, rtol=1e-5, atol=1e-8)
                torch.testing.assert_close(got_m, mlp, rtol=1e-5, atol=1e-8)


def test_padded_eager_batches_with_checkpointing_match():
    model = lively(tiny_model("llama", layers=2, attn_implementation="eager"))
    batch = tokens(2, 12, seed=4)
    mask = torch.ones_like(batch)
    mask[1, :5] = 0                                       # left padding on the second row
    calls = []

    def run(**options):
        stats_model = Taylor(**options)
        original = model.forward

        def forward(input_ids, labels=None, **kw):
            calls.append(1)
            return original(input_ids, attention_mask=mask, labels=labels, **kw)
        model.forward = forward
        try:
            return stats_model(model, [batch])
        finally:
            del model.forward
    plain, lean = run(), run(offload=True, gradient_checkpointing=True)
    for a, b in zip(plain.attn + plain.mlp, lean.attn + lean.mlp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert len(calls) == 2


def test_checkpointing_recomputes_layers_and_restores_forward():
    model = lively(tiny_model("qwen3", layers=2))
    seen = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: seen.append(1))
    Taylor(gradient_checkpointing=True)(model, BATCHES[:1])
    assert len(seen) == 2 * 2                              # forward + recompute, per layer (inside it)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    seen.clear()
    Taylor()(model, BATCHES[:1])
    assert len(seen) == 2


def test_gradients_are_freed_as_they_are_produced(monkeypatch):
    model = lively(tiny_model("llama", layers=3))
    alive = []
    fold = GradientStatistics._fold

    def counting(self, p, **kw):
        alive.append(sum(q.grad is not None for q in self.params))
        return fold(self, p, **kw)
    monkeypatch.setattr(GradientStatistics, "_fold", counting)
    Taylor(second_order=True)(model, BATCHES[:2])
    n_params = 7 * 3
    assert len(alive) == 2 * n_params and max(alive) == 1   # never more than the one being folded


def test_options_compose_from_the_real_configs():
    cfg = compose_job("importance=taylor_2nd", "importance.offload=true",
                      "importance.gradient_checkpointing=true")
    taylor = build(cfg.importance)
    assert (taylor.second_order, taylor.offload, taylor.gradient_checkpointing) == (True, True, True)
    with pytest.raises(Exception, match="offlaod"):
        compose_job("importance=taylor", "importance.offlaod=true")
