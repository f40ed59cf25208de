"""Sparsity patterns of the unstructured family: the spec (unstructured fraction or N:M) and the
keep-masks chosen without weight update (Wanda |W|·‖x‖ per row, magnitude |W| per matrix).
Masks are bool with True = weight kept; N:M = N zeros in every M consecutive inputs of a row."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PruneLabError


@dataclass
class SparsitySpec:
    sparsity: float = 0.0          # unstructured fraction of weights set to 0 (ignored when N:M)
    prune_n: int = 0               # N:M: N zeros in every M inputs (0 = unstructured)
    prune_m: int = 0

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise PruneLabError(f"method.sparsity must be in [0, 1), got {self.sparsity}")
        if self.prune_n < 0 or self.prune_m < 0 or (self.prune_n > 0) != (self.prune_m > 0):
            raise PruneLabError(f"N:M needs both method.prune_n and method.prune_m > 0, got "
                                f"{self.prune_n}:{self.prune_m}")
        if self.prune_n > self.prune_m:
            raise PruneLabError(f"N:M needs N <= M, got {self.prune_n}:{self.prune_m}")
        if self.nm and self.prune_n == self.prune_m:
            raise PruneLabError(f"N:M {self.prune_n}:{self.prune_m} zeros every weight (as method.sparsity=1.0 "
                                f"would): N must be < M")

    @property
    def nm(self) -> bool:
        return self.prune_n > 0

    @property
    def active(self) -> bool:
        return self.nm or self.sparsity > 0

    def check_width(self, cols: int, blocksize: int | None = None) -> None:
        if self.nm and cols % self.prune_m:
            raise PruneLabError(f"N:M with M={self.prune_m} needs input widths divisible by M, got {cols}")
        if self.nm and blocksize is not None and blocksize % self.prune_m:
            raise PruneLabError(f"method.blocksize={blocksize} must be a multiple of M={self.prune_m}")


def lowest_mask(score: Tensor, fraction: float, dim: int | None) -> Tensor:
    """Keep-mask removing exactly floor(fraction·n) lowest scores per row (dim=1) or overall (None)."""
    flat = score if dim is not None else score.reshape(1, -1)
    k = int(flat.shape[1] * fraction)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return mask.reshape(score.shape)


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with exactly the n lowest scores of every m consecutive inputs of a row removed."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2, largest=False).indices, False)
    return mask.reshape(rows, cols)


def baseline_mask(weight: Tensor, spec: SparsitySpec, input_sq_norm: Tensor | None) -> Tensor:
    """Magnitude (input_sq_norm None; one threshold per matrix) or Wanda (|W|·‖x‖, per output row)."""
    score = weight.float().abs()
    if input_sq_norm is not None:
        score = score * input_sq_norm.float().sqrt()[None, :]
    if spec.nm:
        return nm_mask(score, spec.prune_n, spec.prune_m)
    return lowest_mask(score, spec.sparsity, dim=1 if input_sq_norm is not None else None)
