"""Dense linear algebra shared by both method families."""
from __future__ import annotations

import torch
from torch import Tensor


def cholesky_to_inverse(factor: Tensor) -> Tensor:
    """A⁻¹ from the lower Cholesky factor L of A (A = L Lᵀ), symmetric.

    The same matrix as torch.cholesky_inverse(L) to round-off, by two triangular solves against I:
    torch's CPU cholesky_inverse (LAPACK potri) is 5-12x slower at the widths the engine inverts
    (576-4096, float64; experiments/results/engine_speed.md)."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    inv = torch.cholesky_solve(eye, factor)
    return (inv + inv.mT).mul_(0.5)
