"""Tensor math of the consumer-projection refit (no I/O): least squares, bias shift, structured OBS.

Notation (per linear, features x tokens): X = inputs on the dense path, X~ = inputs on the pruned path.
  G = X~ X~ᵀ (gram), C = X X~ᵀ (cross), D = X Xᵀ (dense_gram).
A refit W' of the kept columns K minimises ||W X - W'_K X~_K||²:  W'_K = W C[:, K] (G_KK + λI)⁻¹,
λ = damp · mean(diag G_KK). With a bias, X and X~ are augmented with a constant 1 row (affine fit).
Every solve is in float64 with Cholesky; a Gram that damping does not make positive definite gets
its damping raised tenfold (never NaN). Blocks: a GQA group is `width` consecutive columns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PruneLabError

MAX_DAMP_RAISES = 6


def damped_cholesky(h: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor of h + λI, λ = damp·mean(diag h), raised until it factorises."""
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * mean_diag
    for _ in range(MAX_DAMP_RAISES + 1):
        factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0 and torch.isfinite(factor).all():
            return factor
        lam = lam * 10
    raise PruneLabError("the calibration Gram matrix is not positive definite even with damping "
                        "raised 10^6-fold: calibration data contain NaN/inf?")


def augmented(stats, with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(G, C, D) in float64, with the constant-1 feature appended last when with_bias."""
    g, c, d = (t.double() for t in (stats.gram, stats.cross, stats.dense_gram))
    if not with_bias:
        return g, c, d
    n = float(stats.count)
    s_p, s_d = stats.sum.double(), stats.dense_sum.double()
    one = torch.tensor([[n]], dtype=torch.float64, device=g.device)
    g = torch.cat([torch.cat([g, s_p[:, None]], 1), torch.cat([s_p[None], one], 1)])
    c = torch.cat([torch.cat([c, s_d[:, None]], 1), torch.cat([s_p[None], one], 1)])
    d = torch.cat([torch.cat([d, s_d[:, None]], 1), torch.cat([s_d[None], one], 1)])
    return g, c, d


def augmented_drift(stats, with_bias: bool) -> Tensor | None:
    """Σ (h - h~) x~ᵀ, with the Σ (h - h~) column for the bias feature when with_bias."""
    if stats.resid_cross is None:
        return None
    r = stats.resid_cross.double()
    return torch.cat([r, stats.resid_sum.double()[:, None]], 1) if with_bias else r


def lstsq(w: Tensor, g: Tensor, c: Tensor, keep: Tensor, damp: float, drift: Tensor | None = None) -> Tensor:
    """Full-width W' (float64) with columns outside `keep` zero and W'_K = W C[:, K] (G_KK + λI)⁻¹.
    `drift` (out, in) = Σ (h - h~) x~ᵀ also makes the refit absorb the residual-stream drift."""
    w = w.double()
    gk = g[keep][:, keep]
    rhs = w @ c[:, keep]
    if drift is not None:
        rhs = rhs + drift.double()[:, keep]
    rhs = rhs.T                                       # (K, out)
    sol = torch.cholesky_solve(rhs, damped_cholesky(gk, damp)).T
    out = torch.zeros_like(w)
    out[:, keep] = sol
    return out


def bias_shift(w: Tensor, keep: Tensor, mean_dense: Tensor, mean_pruned: Tensor) -> Tensor:
    """Best bias change with W_K fixed: W E[x] - W_K E[x~_K] (FLAP's W_R E[x_R] on one stream)."""
    w = w.double()
    return w @ mean_dense.double() - w[:, keep] @ mean_pruned.double()[keep]


def block_columns(blocks: Tensor, width: int) -> Tensor:
    """Column indices of whole blocks: block b owns columns [b*width, (b+1)*width)."""
    return (blocks[:, None] * width + torch.arange(width, device=blocks.device)).reshape(-1)


def obs_select(w: Tensor, g: Tensor, n_blocks: int, width: int, k: int, damp: float,
               chunk: int = 1, row_weight: Tensor | None = None) -> tuple[list[int], list[float]]:
    """Greedy structured OBS: remove k of n_blocks column blocks of W, each step the block(s) whose
    removal (with the optimal update of the rest) raises ||W X~||-error least, tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ),
    then downdate H⁻¹ and W. `chunk` blocks are taken per step; columns past n_blocks*width (e.g. the
    bias feature) are never removed. `row_weight` (out,) weighs each output row's error in the choice
    (the update is row by row, so it does not change). Returns the removed blocks in order and the
    error each one was removed at."""
    w = w.double().clone()
    f = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if row_weight is None else row_weight.double()
    hinv = torch.cholesky_inverse(damped_cholesky(g, damp))
    alive = torch.ones(n_blocks, dtype=torch.bool, device=w.device)
    removed, errors = [], []
    idx = torch.arange(n_blocks, device=w.device)
    while len(removed) < k:
        cols = block_columns(idx, width).view(n_blocks, width)             # (n, width)
        if width == 1:
            err = (f @ w[:, :n_blocks].pow(2)) / hinv.diagonal()[:n_blocks].clamp_min(1e-30)
        else:
            hbb = hinv[cols[:, :, None], cols[:, None, :]]                 # (n, width, width)
            wb = w[:, cols].permute(1, 0, 2)                               # (n, out, width)
            err = torch.einsum("nor,nrs,nos,o->n", wb, torch.linalg.pinv(hbb, hermitian=True), wb, f)
        err = torch.where(alive, err, torch.full_like(err, float("inf")))
        take = torch.topk(-err, min(chunk, k - len(removed))).indices
        cols_t = cols[take].reshape(-1)
        inv_t = torch.linalg.pinv(hinv[cols_t][:, cols_t], hermitian=True)
        w -= (w[:, cols_t] @ inv_t) @ hinv[cols_t]                         # OBS update of the rest
        hinv -= hinv[:, cols_t] @ inv_t @ hinv[cols_t]
        w[:, cols_t] = 0
        hinv[cols_t, :] = 0
        hinv[:, cols_t] = 0
        alive[take] = False
        removed += take.tolist()
        errors += err[take].tolist()
    return removed, errors
