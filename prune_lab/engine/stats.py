"""Input statistics of one nn.Linear over calibration tokens (fp32), accumulated batch by batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor


@dataclass
class InputStats:
    """Statistics of one nn.Linear's input features over the calibration tokens (fp32)."""

    sum: Tensor                       # (in,) sum x
    sum_sq: Tensor                    # (in,) sum x^2
    abs_sum: Tensor                   # (in,) sum |x|
    count: int                        # tokens accumulated (padding excluded)
    gram: Tensor | None = None        # (in, in) sum x~ x~ᵀ on the stream the layer sees
    cross: Tensor | None = None       # (in, in) sum x x~ᵀ, x on the dense path (== gram on one stream)
    dense_gram: Tensor | None = None  # (in, in) sum x xᵀ on the dense path (== gram on one stream)
    dense_sum: Tensor | None = None   # (in,) sum x on the dense path (== sum on one stream)
    resid_cross: Tensor | None = None  # (out, in) sum (h - h~) x~ᵀ: residual-stream drift where the output lands
    resid_sum: Tensor | None = None    # (out,) sum (h - h~)

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> Tensor:
        """Population variance per feature."""
        return (self.sum_sq / max(self.count, 1) - self.mean ** 2).clamp_min(0)

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.count, 1)


class Accumulator:
    """Per-linear fp32 accumulators fed by forward hooks; the token mask drops padding."""

    def __init__(self, lin: nn.Linear, gram: bool, cross: bool, device, residual: bool = False):
        n = lin.in_features
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.sum, self.sum_sq, self.abs_sum, self.count = z(n), z(n), z(n), 0
        self.gram = z(n, n) if gram or cross else None
        self.cross = z(n, n) if cross else None
        self.dense_gram = z(n, n) if cross else None
        self.dense_sum = z(n) if cross else None
        self.dense_x: Tensor | None = None
        self.resid_cross = z(lin.out_features, n) if residual else None
        self.resid_sum = z(lin.out_features) if residual else None
        self.res_dense: Tensor | None = None     # set by the residual hooks before each add
        self.res_pruned: Tensor | None = None

    def add(self, x: Tensor) -> None:
        self.sum += x.sum(0)
        self.sum_sq += x.pow(2).sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        if self.cross is not None:
            d, self.dense_x = self.dense_x, None
            self.cross.addmm_(d.T, x)
            self.dense_gram.addmm_(d.T, d)
            self.dense_sum += d.sum(0)
        if self.resid_cross is not None:
            r = self.res_dense - self.res_pruned
            self.resid_cross.addmm_(r.T, x)
            self.resid_sum += r.sum(0)

    def stats(self) -> InputStats:
        single = self.cross is None
        return InputStats(self.sum, self.sum_sq, self.abs_sum, self.count, self.gram,
                          self.gram if single else self.cross, self.gram if single else self.dense_gram,
                          self.sum if single else self.dense_sum, self.resid_cross, self.resid_sum)


def token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return x if mask is None else x[mask.reshape(-1)]


# ---- layer output errors from the Gram matrices (G = X~X~ᵀ, C = XX~ᵀ, D = XXᵀ) --------------------
def output_error(w: Tensor, w_new: Tensor, g: Tensor, c: Tensor, d: Tensor) -> float:
    """||W X - W' X~||² from the Gram matrices (w, w_new: full width, zero columns where removed)."""
    w, w_new = w.double(), w_new.double()
    err = (w @ d * w).sum() - 2 * (w @ c * w_new).sum() + (w_new @ g * w_new).sum()
    return float(err.clamp_min(0))


def dense_energy(w: Tensor, d: Tensor) -> float:
    """||W X||²: the reference for relative errors."""
    w = w.double()
    return float((w @ d * w).sum())
