"""method=wanda."""
from __future__ import annotations

from torch import Tensor

from .base import Unstructured


class Wanda(Unstructured):
    """|W|·‖x‖ compared within each output row (Sun et al. 2023); no weight update."""

    name = "wanda"

    def input_norm(self, stats) -> Tensor:
        return stats.sum_sq
