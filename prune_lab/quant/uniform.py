"""quant=uniform: one bit width for every output channel (GPTQ when run in the sweep)."""
from __future__ import annotations

import torch

from ..errors import PruneLabError
from .base import Quantizer
from .grid import RowQuantizer, check_bits_options


class Uniform(Quantizer):
    """quant=uniform: one bit width for every output channel (GPTQ when run in the sweep)."""

    enabled = True

    def __init__(self, bits: int = 4, sym: bool = True, group_size: int | None = None,
                 bits_options=(2, 3, 4, 6, 8), act_order: bool = False):
        check_bits_options(list(bits_options))
        if bits not in bits_options:
            raise PruneLabError(f"quant.bits={bits} is not one of quant.bits_options {list(bits_options)}")
        if group_size is not None and group_size < 1:
            raise PruneLabError(f"quant.group_size must be a positive number of columns or null, got {group_size}")
        self.bits, self.sym, self.group_size, self.act_order = bits, sym, group_size, act_order
        self.bits_options = sorted(int(b) for b in bits_options)

    def allocate(self, weights, stats, hinv_diags, layer=None, factor_diags=None):
        return {p: torch.full((w.shape[0],), self.bits, dtype=torch.int64) for p, w in weights.items()}, {}

    def quantizer(self, bits):
        return RowQuantizer(bits, self.sym, self.group_size)
