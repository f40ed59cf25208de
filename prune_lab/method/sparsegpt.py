"""method=sparsegpt."""
from __future__ import annotations

from .base import Unstructured
from .sweep import obs_sweep


class SparseGPT(Unstructured):
    """OBS with lazy block updates and adaptive per-block masks (Frantar & Alistarh 2023), fused with
    GPTQ quantization in the same sweep when quant is enabled."""

    name = "sparsegpt"
    updates_weights = True

    def __init__(self, *args, asymmetric: float = 0.25, residual: bool = True, **kwargs):
        super().__init__(*args, asymmetric=asymmetric, residual=residual, **kwargs)

    def sparsify(self, weight, stats, hessian, factor, bits):
        new, mask, _ = obs_sweep(weight, hessian, self.spec, blocksize=self.blocksize, damp=self.damp,
                                 quantizer=self.grid_quantizer(bits), factor=factor,
                                 act_order=self.quant.act_order)
        return new, mask
