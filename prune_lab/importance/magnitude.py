"""importance=magnitude."""
from __future__ import annotations

import torch

from ..core.adapter import layer_views
from ..core.scores import UnitScores
from .base import Importance
from .units import reduce_to_units


class Magnitude(Importance):
    """L1 norm of every weight of the unit: sum |θ|."""

    name = "magnitude"

    @torch.no_grad()
    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        return reduce_to_units(layer_views(model), lambda term: term.param.abs())
