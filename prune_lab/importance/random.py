"""importance=random."""
from __future__ import annotations

import torch

from ..core.adapter import layer_views
from ..core.scores import UnitScores
from .base import Importance


class Random(Importance):
    """Uniform random unit scores from the job seed (the baseline every criterion must beat)."""

    name = "random"

    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        gen = torch.Generator().manual_seed(seed)
        views = layer_views(model)
        return UnitScores([torch.rand(v.attn.num_kv_heads, generator=gen) for v in views],
                          [torch.rand(v.mlp.width, generator=gen) for v in views])
