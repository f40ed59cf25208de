"""Layer importance (twin of conf/layer_importance/*.yaml): one score per decoder layer."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import decoder_layers
from .eval.ppl import nll_sum


class _Bypass(nn.Module):
    """Stands in for a decoder layer: returns its input hidden states unchanged."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def bypassed(model: nn.Module, index: int):
    layers = decoder_layers(model)
    original = layers[index]
    layers[index] = _Bypass(original)
    try:
        yield
    finally:
        layers[index] = original


def _ppl(model, batches) -> float:
    total = count = 0
    for b in batches:
        s, c = nll_sum(model, b)
        total, count = total + s, count + c
    return math.exp(total / count)


class Removal:
    """PPL rise on the calibration batches when the layer is bypassed (higher = more important)."""

    name = "removal"

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor]) -> torch.Tensor:
        base = _ppl(model, batches)
        scores = []
        for i in range(len(decoder_layers(model))):
            with bypassed(model, i):
                scores.append(_ppl(model, batches) - base)
        return torch.tensor(scores, dtype=torch.float32)


class Activation:
    """Block Influence (ShortGPT): mean 1 - cos(input, output) of each layer over tokens."""

    name = "activation"

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor]) -> torch.Tensor:
        layers = decoder_layers(model)
        sums = torch.zeros(len(layers), dtype=torch.float64)
        count = 0

        def make_hook(i):
            def hook(_mod, args, kwargs, out):
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                sums[i] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().item()
            return hook

        handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True)
                   for i, layer in enumerate(layers)]
        try:
            for b in batches:
                model(b.to(model.device))
                count += b.numel()
        finally:
            for h in handles:
                h.remove()
        return (sums / count).float()
