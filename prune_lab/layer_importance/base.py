"""Layer importance lifecycle (twin of conf/layer_importance/*.yaml): one score per decoder
layer, higher = more important; plus the layer bypass that removal scoring uses."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..core.adapter import decoder_layers
from ..errors import PruneLabError
from ..eval.ppl import nll_sum


class LayerImportance:
    """Base: one score per decoder layer, higher = more important.

    n_samples: calibration windows for layer importance (null = calibration.n_samples), so layer
    and unit importance can use different amounts of data (the original used 50 and 10).
    `cacheable`: the pipeline may keep the scores in the score cache; `version` (the criterion's
    arithmetic) is part of its key, so scores of older code are never reused.
    """

    cacheable = True
    name = "layer_importance"
    version = 1          # the criterion's arithmetic: bump it when its scores change (score-cache key)

    def __init__(self, n_samples: int | None = None):
        if n_samples is not None and n_samples < 1:
            raise PruneLabError(f"layer_importance.n_samples must be >= 1 or null, got {n_samples}")
        self.n_samples = n_samples

    def __call__(self, model, batches: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def check_model(self, views) -> None:
        """What depends on the loaded model's layers (LayerViews), checked before any scoring."""

    def origin(self, tokens_fingerprint: str | None) -> dict:
        """Where the scores come from, for scores.safetensors' metadata (artifacts/scores.py ORIGIN)."""
        return {"layer_tokens": tokens_fingerprint}


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


def calibration_ppl(model, batches) -> float:
    total = count = 0
    for b in batches:
        s, c = nll_sum(model, b)
        total, count = total + s, count + c
    return math.exp(total / count)
