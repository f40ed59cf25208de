"""Depth pruning: remove whole layers, least important first."""
from __future__ import annotations

import numpy as np

from ..core.plan import PruningPlan
from ..errors import PruneLabError
from .base import Allocator


class Depth(Allocator):
    """Remove `n_layers` layers, or (n_layers=null) the count whose parameters come closest to ratio."""

    needs_layer_importance = True
    needs_unit_scores = False

    def __init__(self, ratio: float = 0.25, n_layers: int | None = None,
                 layer_start: int = 0, layer_end: int | None = None, multiple_of: int = 1):
        super().__init__(ratio, layer_start, layer_end, multiple_of)
        self.n_layers = n_layers

    @property
    def removes_nothing(self) -> bool:
        return self.n_layers == 0 or (self.n_layers is None and self.ratio == 0)

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        if layer_importance is None:
            raise PruneLabError("allocator=depth needs layer importance (layer_importance=removal|activation)")
        self.check_inputs(views, layer_importance=layer_importance)
        eligible = np.flatnonzero(self.eligible(views))
        imp = layer_importance.double().cpu().numpy()
        order = eligible[np.lexsort((eligible, imp[eligible]))]
        sizes = np.cumsum([0] + [views[i].num_params for i in order])   # params of the first n in order
        if self.n_layers is not None:
            n = self.n_layers
            if not 0 <= n < len(views) or n > len(order):
                raise PruneLabError(f"cannot remove {n} layers ({len(order)} eligible of {len(views)}, "
                                    f"one must stay)")
            target = int(sizes[n])   # the layer count is the request, not the ratio
        else:   # the n whose removed params come closest to the ratio, keeping at least one layer
            target = self.target(views)
            n = int(np.argmin(np.abs(sizes[: len(views)] - target)))
        return PruningPlan(layers=order[:n].tolist(), target_params=target)
