"""importance=flap: FLAP's fluctuation metric, from the layer-sequential engine."""
from __future__ import annotations

import torch

from ..core.adapter import layer_views
from ..core.scores import UnitScores
from ..engine import Engine, LayerMethod
from .base import Importance


class _Fluctuation(LayerMethod):
    """Engine method: one stage with the two consumers; keeps their input stats, changes nothing."""

    def __init__(self):
        self.stats: dict[int, dict] = {}

    def stages(self, view):
        return [["attn.o", "mlp.down"]]

    def apply(self, index, view, stats):
        self.stats[index] = stats
        return {}


class Flap(Importance):
    """FLAP's fluctuation: per input feature of o_proj/down_proj, var(x) · ||W[:, j]||² (the output
    variance the unit carries, which a bias cannot restore), summed over a GQA group's G·head_dim
    columns. Computed in the layer-sequential engine without gradients (dense path)."""

    name = "flap"

    def __init__(self, engine=None):
        self.engine = engine

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        method = _Fluctuation()
        (self.engine or Engine(str(model.device))).walk(model, batches, method, propagate="dense")
        attn, mlp = [], []
        for v in layer_views(model):
            s = method.stats[v.index]
            o = s["attn.o"].var * v.attn.o.weight.float().pow(2).sum(0)
            attn.append(o.reshape(v.attn.num_kv_heads, -1).sum(1).cpu())
            mlp.append((s["mlp.down"].var * v.mlp.down.weight.float().pow(2).sum(0)).cpu())
        return UnitScores(attn, mlp)
