"""Depth pruning: remove whole layers, least important first."""
from __future__ import annotations

import numpy as np

from ..errors import PruneLabError
from ..plan import PruningPlan
from .base import Allocator


class Depth(Allocator):
    """Remove `n_layers` layers, or (n_layers=null) the fewest whose parameters reach ~ratio."""

    needs_layer_importance = True

    def __init__(self, ratio: float = 0.25, n_layers: int | None = None,
                 layer_start: int = 0, layer_end: int | None = None):
        super().__init__(ratio, layer_start, layer_end)
        self.n_layers = n_layers

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        if layer_importance is None:
            raise PruneLabError("allocator=depth needs layer importance (layer_importance=removal|activation)")
        eligible = np.flatnonzero(self.eligible(views))
        imp = layer_importance.double().cpu().numpy()
        order = eligible[np.lexsort((eligible, imp[eligible]))]
        if self.n_layers is not None:
            n = self.n_layers
        else:   # smallest n whose removed params come closest to the target
            target = self.target(views)
            cum = np.cumsum([views[i].num_params for i in order])
            n = int(np.argmin(np.abs(np.concatenate([[0], cum]) - target)))
        if not 0 <= n < len(views) or n > len(order):
            raise PruneLabError(f"cannot remove {n} layers ({len(order)} eligible of {len(views)})")
        return PruningPlan(layers=order[:n].tolist(), target_params=self.target(views))
