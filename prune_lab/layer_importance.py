"""Layer importance (twin of conf/layer_importance/*.yaml): one score per decoder layer."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm.auto import tqdm

from .adapter import decoder_layers
from .errors import PruneLabError
from .eval.ppl import nll_sum
from .importance import scores_file


class LayerImportance:
    """Base: one score per decoder layer, higher = more important.

    n_samples: calibration windows for layer importance (null = calibration.n_samples), so layer
    and unit importance can use different amounts of data (the original used 50 and 10).
    `cacheable`: the pipeline may keep the scores in the score cache.
    """

    cacheable = True
    name = "layer_importance"

    def __init__(self, n_samples: int | None = None):
        if n_samples is not None and n_samples < 1:
            raise PruneLabError(f"layer_importance.n_samples must be >= 1 or null, got {n_samples}")
        self.n_samples = n_samples

    def __call__(self, model, batches: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


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


class Removal(LayerImportance):
    """PPL rise on the calibration batches when the layer is bypassed (higher = more important)."""

    name = "removal"

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor]) -> torch.Tensor:
        base = _ppl(model, batches)
        scores = []
        for i in tqdm(range(len(decoder_layers(model))), desc="removal: layer", leave=False):
            with bypassed(model, i):
                scores.append(_ppl(model, batches) - base)
        return torch.tensor(scores, dtype=torch.float32)


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


class FromFile(LayerImportance):
    """Layer importance saved by an earlier run: layers.json ("layer_importance"), or the "layer"
    tensor of scores.safetensors; a run dir means its layers.json."""

    cacheable = False
    name = "file"

    def __init__(self, path: str, n_samples: int | None = None):
        super().__init__(n_samples)
        self.path = scores_file(path, "layers.json")

    def __call__(self, model=None, batches=None) -> torch.Tensor:
        if self.path.suffix == ".json":
            values = json.loads(self.path.read_text()).get("layer_importance")
        else:
            from safetensors.torch import load_file
            values = load_file(str(self.path)).get("layer")
        if values is None:
            raise PruneLabError(f"'{self.path}' holds no layer importance (the run had layer_importance=none?)")
        return torch.as_tensor(values, dtype=torch.float32)
