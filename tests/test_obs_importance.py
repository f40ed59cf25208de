"""importance=obs: loss sensitivity vs autograd, greedy OBS unit scores vs a hooked Gram, weighted choice."""
from __future__ import annotations

import pytest
import torch

from conftest import lively, tiny_model, tokens
from prune_lab.reconstruct import refit
from prune_lab.core.adapter import layer_views
from prune_lab.importance import ObsError
from prune_lab.importance.obs import output_sensitivity
from test_reconstruct import brute_force_obs, hooked


def batches():
    return [tokens(2, 20, seed=11 + i) for i in range(3)]


def test_sensitivity_is_the_squared_gradient_of_the_loss_at_each_output():
    model = lively(tiny_model("llama"))
    sens = output_sensitivity(model, batches())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())   # no weight grads kept
    down = layer_views(model)[1].mlp.down
    total = 0
    for b in batches():
        outs = []

        def keep(_m, _i, o):
            o.retain_grad()
            outs.append(o)
        h = down.register_forward_hook(keep)
        x = model.get_input_embeddings()(b).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=b).loss.backward()
        h.remove()
        total = total + outs[0].grad.pow(2).reshape(-1, outs[0].shape[-1]).sum(0)
    torch.testing.assert_close(sens[1]["mlp"], total, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
def test_scores_follow_the_greedy_obs_order_on_the_hooked_gram(weighted):
    model = lively(tiny_model("qwen3"))
    scores = ObsError(weighted=weighted, chunks=1000)(model, batches())
    view = layer_views(model)[2]
    g = (lambda x: x.T @ x)(hooked(model, batches(), lambda m: layer_views(m)[2].mlp.down))
    f = output_sensitivity(model, batches())[2]["mlp"] if weighted else None
    order, errors = refit.obs_select(view.mlp.down.weight, g, view.mlp.width, 1, view.mlp.width - 1, 0.01, 1, f)
    expected = torch.tensor(errors).cummax(0).values
    torch.testing.assert_close(scores.mlp[2][order].double(), expected.double(), rtol=1e-3, atol=1e-12)
    assert scores.mlp[2].argmax() not in order                 # the survivor scores highest


def test_weighted_obs_step_equals_brute_force_with_row_weights():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 30, generator=gen, dtype=torch.float64)
    g, w = x @ x.T, torch.randn(5, 8, generator=gen, dtype=torch.float64)
    f = torch.tensor([10.0, 0.1, 1.0, 3.0, 0.01], dtype=torch.float64)
    h = g + 1e-3 * g.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    (block,), (err,) = refit.obs_select(w, g, 4, 2, 1, 1e-3, row_weight=f)
    brute = brute_force_obs(f.sqrt()[:, None] * w, h, 2, [])   # weighting rows = scaling them
    assert block == min(brute, key=brute.get) and err == pytest.approx(brute[block], rel=1e-6)
