"""layer_importance=activation (Block Influence, ShortGPT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.adapter import decoder_layers
from ..engine.hooks import Hooks
from .base import LayerImportance


class Activation(LayerImportance):
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

        with Hooks() as hooks:
            for i, layer in enumerate(layers):
                hooks.add(layer.register_forward_hook(make_hook(i), with_kwargs=True))
            for b in batches:
                model(b.to(model.device))
                count += b.numel()
        return (sums / count).float()
