"""The quant group's contract (twin of conf/quant/*.yaml): quant=none is the contract's defaults."""
from __future__ import annotations

from torch import Tensor

from .grid import RowQuantizer


class Quantizer:
    """The contract every quant option keeps (the engine's methods and the compression record read it).

    enabled: the sweep quantizes; act_order: visit columns by decreasing diag(H); sym / group_size:
    the grid (None when nothing is quantized, recorded as null); bits_options: the bit widths a row
    may get. allocate(weights, stats, hinv_diags, layer, factor_diags) -> (bits per row of each linear, score
    range of each linear), over the linears of one engine stage of decoder layer `layer` (hinv_diags:
    diag(H⁻¹); factor_diags: diag(U), U the upper Cholesky factor of H⁻¹); quantizer(bits) -> the RowQuantizer of one linear."""

    enabled: bool = False
    act_order: bool = False
    sym: bool | None = None
    group_size: int | None = None
    bits_options: tuple[int, ...] = ()

    def allocate(self, weights: dict, stats: dict, hinv_diags: dict, layer: int | None = None,
                 factor_diags: dict | None = None) -> tuple[dict, dict]:
        return {}, {}

    def check_model(self, views) -> None:
        """What the loaded model must offer (quant.layer_avg_bits' layers): checked before any work."""

    def quantizer(self, bits: Tensor | None) -> RowQuantizer | None:
        return None


class NoQuant(Quantizer):
    """quant=none: weights stay in the model's float dtype."""
