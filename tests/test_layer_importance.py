"""Layer importance: the bypass is an identity layer, Removal = PPL rise, Activation = 1 - cos."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import lively, tiny_model, tokens
from prune_lab.eval.ppl import nll_sum
from prune_lab.layer_importance import Activation, Removal
from prune_lab.layer_importance.base import bypassed
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import zero_units

BATCHES = [tokens(2, 16, seed=s) for s in (4, 5)]


def ppl(model) -> float:
    sums = [nll_sum(model, b) for b in BATCHES]
    return math.exp(sum(s for s, _ in sums) / sum(c for _, c in sums))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bypass_makes_the_layer_an_identity(arch):
    model = lively(tiny_model(arch))
    original = list(model.model.layers)
    with torch.no_grad():
        dense = model(BATCHES[0]).logits
        with bypassed(model, 1):
            skipped = model(BATCHES[0]).logits
        identity = zero_units(copy.deepcopy(model), PruningPlan(layers=[1]))(BATCHES[0]).logits
        after = model(BATCHES[0]).logits
    assert (skipped - identity).abs().max() < 1e-5
    assert (skipped - dense).abs().max() > 1e-2
    assert list(model.model.layers) == original and torch.equal(after, dense)


def test_removal_scores_are_the_ppl_rise_of_each_bypassed_layer():
    model = lively(tiny_model("mistral"))
    scores = Removal()(model, BATCHES)
    base = ppl(model)
    expected = [ppl(zero_units(copy.deepcopy(model), PruningPlan(layers=[i]))) - base for i in range(3)]
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-3)
    assert scores.abs().min() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_activation_is_one_minus_cosine_in_zero_two(arch):
    model = lively(tiny_model(arch))
    scores = Activation()(model, BATCHES)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 2)).all()
    per_layer = torch.zeros(2)
    with torch.no_grad():
        for b in BATCHES:
            hidden = model(b, output_hidden_states=True).hidden_states   # [embeddings, layer 0, layer 1, normed]
            for i in range(2):
                per_layer[i] += (1 - F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)).sum()
    expected = per_layer / sum(b.numel() for b in BATCHES)
    torch.testing.assert_close(scores[:2], expected, rtol=1e-4, atol=1e-6)


def test_activation_of_an_identity_layer_is_zero():
    model = lively(tiny_model("llama"))
    zero_units(model, PruningPlan(layers=[2]))
    scores = Activation()(model, BATCHES)
    assert scores[2].abs() < 1e-5 and (scores[:2] > 1e-3).all()
