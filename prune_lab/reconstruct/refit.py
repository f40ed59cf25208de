"""Tensor math of the consumer-projection refit (no I/O): least squares, bias shift, structured OBS.

Notation (per linear, features x tokens): X = inputs on the dense path, X~ = inputs on the pruned path.
  G = X~ X~ᵀ (gram), C = X X~ᵀ (cross), D = X Xᵀ (dense_gram).
A refit W' of the kept columns K minimises ||W X - W'_K X~_K||²:  W'_K = (W C)[:, K] (G_KK + λI)⁻¹,
λ = damp · mean(diag G_KK). Of C and D only W·C (`wc`) and tr(W D Wᵀ) (`energy`) are read (the engine
accumulates them per linear). With a bias, X and X~ are augmented with a constant 1 row (affine fit).
Every solve is in float64 with Cholesky; a Gram that damping does not make positive definite gets
its damping raised tenfold (never NaN). Blocks: a GQA group is `width` consecutive columns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PruneLabError

MAX_DAMP_RAISES = 6
ADAPTIVE_TOL = 0.1   # obs_select(adaptive=True): joint error allowed above the sum of the blocks' own


def damped_cholesky(h: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor of h + λI, λ = damp·mean(diag h), raised until it factorises."""
    return damped_factor(h, damp)[0]


def damped_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(lower Cholesky factor of h + λI, the λ it took): λ = damp·mean(diag h), raised until it factorises."""
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    lam = damp * mean_diag
    for _ in range(MAX_DAMP_RAISES + 1):
        damped = h.clone()
        damped.diagonal().add_(lam)                        # h + λI without an n x n identity
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and torch.isfinite(factor).all():
            return factor, lam
        lam = lam * 10
    raise PruneLabError("the calibration Gram matrix is not positive definite even with damping "
                        "raised 10^6-fold: calibration data contain NaN/inf?")


def augmented(stats, weight: Tensor, bias: Tensor | None, with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(G, W·C, tr(W D Wᵀ)) in float64 for the linear's weight (and bias, when with_bias: the constant-1
    feature appended last, W = [W b])."""
    g, wc, energy = stats.gram.double(), stats.w_cross(weight), stats.w_energy(weight)
    if not with_bias:
        return g, wc, energy
    n = float(stats.count)
    s_p = stats.sum.double()
    w_sd = weight.double() @ stats.dense_sum.double()                  # W Σx
    b = torch.zeros_like(w_sd) if bias is None else bias.double()
    one = torch.tensor([[n]], dtype=torch.float64, device=g.device)
    g = torch.cat([torch.cat([g, s_p[:, None]], 1), torch.cat([s_p[None], one], 1)])
    wc = torch.cat([wc + b[:, None] * s_p[None], (w_sd + n * b)[:, None]], 1)
    return g, wc, energy + 2 * (b @ w_sd) + n * (b @ b)


def augmented_drift(stats, with_bias: bool) -> Tensor | None:
    """Σ (h - h~) x~ᵀ, with the Σ (h - h~) column for the bias feature when with_bias."""
    if stats.resid_cross is None:
        return None
    r = stats.resid_cross.double()
    return torch.cat([r, stats.resid_sum.double()[:, None]], 1) if with_bias else r


def ridge_inverse(g: Tensor, damp: float) -> Tensor:
    """(G + λI)⁻¹ (float64)."""
    return torch.cholesky_inverse(damped_cholesky(g, damp))


def lstsq(wc: Tensor, g: Tensor, keep: Tensor, damp: float, drift: Tensor | None = None) -> Tensor:
    """Full-width W' (float64) with columns outside `keep` zero and W'_K = (W C)[:, K] (G_KK + λI)⁻¹.
    `drift` (out, in) = Σ (h - h~) x~ᵀ also makes the refit absorb the residual-stream drift."""
    rhs = wc[:, keep] if drift is None else wc[:, keep] + drift.double()[:, keep]
    sol = torch.cholesky_solve(rhs.T, damped_cholesky(g[keep[:, None], keep], damp)).T
    out = torch.zeros_like(wc)
    out[:, keep] = sol
    return out


def anchored_lstsq(wcs: list[Tensor], g: Tensor, ws: list[Tensor], damp: float) -> list[Tensor]:
    """Refit of linears that keep every input (the producers q/k/v, gate/up on the drifted pruned path):
    W' = argmin ||W X - W' X~||² + λ||W' - W||² = (W·C + λW)(G + λI)⁻¹, one factor for the linears that
    share the input. The ridge pulls towards the dense W (not towards 0): on one stream W' = W exactly."""
    factor, lam = damped_factor(g, damp)
    rhs = torch.cat([wc + lam * w.double() for wc, w in zip(wcs, ws)])
    sol = torch.cholesky_solve(rhs.T, factor).T
    return list(sol.split([w.shape[0] for w in ws]))


def obs_on_refit(wc: Tensor, g: Tensor, drift: Tensor | None, n_blocks: int, width: int, k: int, damp: float,
                 block: int, adaptive: bool) -> list[int]:
    """The k blocks greedy structured OBS removes from the full refit W·C (G + λI)⁻¹ (with the residual
    `drift` when given): how reconstruct=obs (and the search's pruned-path levels) choose units."""
    hinv = ridge_inverse(g, damp)                     # one factorisation: the full refit and the OBS
    full = (wc if drift is None else wc + drift.double()) @ hinv
    return obs_select(full, g, n_blocks, width, k, damp, block, adaptive=adaptive, hinv=hinv)[0]


def bias_shift(w: Tensor, keep: Tensor, mean_dense: Tensor, mean_pruned: Tensor) -> Tensor:
    """Best bias change with W_K fixed: W E[x] - W_K E[x~_K] (FLAP's W_R E[x_R] on one stream)."""
    w = w.double()
    return w @ mean_dense.double() - w[:, keep] @ mean_pruned.double()[keep]


def block_columns(blocks: Tensor, width: int) -> Tensor:
    """Column indices of whole blocks: block b owns columns [b*width, (b+1)*width)."""
    return (blocks[:, None] * width + torch.arange(width, device=blocks.device)).reshape(-1)


def obs_select(w: Tensor, g: Tensor, n_blocks: int, width: int, k: int, damp: float, block: int = 1,
               row_weight: Tensor | None = None, *, adaptive: bool = False, hinv: Tensor | None = None,
               tol: float = ADAPTIVE_TOL) -> tuple[list[int], list[float]]:
    """Greedy structured OBS: remove k of n_blocks column blocks of W, each step the `block` blocks whose
    removal (with the optimal update of the rest) raises ||W X~||-error least, tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ),
    then downdate H⁻¹ by the chosen blocks together and update W (block = 1: the exact greedy). Columns
    past n_blocks*width (e.g. the bias feature) are never removed. `row_weight` (out,) weighs each output
    row's error in the choice (the update is row by row, so it does not change). `adaptive`: `block` is
    the largest step; a step whose joint error exceeds the sum of its blocks' own errors by more than
    `tol` (the blocks interact) is halved until it does not, and the next step may double again.
    `hinv` = (G + λI)⁻¹ if already computed. Returns the removed blocks in order and the error each one
    was removed at.

    H⁻¹ is downdated lazily: after removing the columns R, H⁻¹_R = H⁻¹ - Q Qᵀ with Q = H⁻¹[:, R] L⁻ᵀ
    (L Lᵀ = H⁻¹_RR), so a step costs O(n·|R|·b) instead of O(n²·b) and never rewrites the n x n matrix."""
    w = w.detach().double().clone()
    f = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if row_weight is None else row_weight.double()
    h0 = ridge_inverse(g.double(), damp) if hinv is None else hinv.double()
    n_cols = h0.shape[0]
    q = torch.zeros(n_cols, k * width, dtype=h0.dtype, device=h0.device)
    diag = h0.diagonal().clone()
    alive = torch.ones(n_blocks, dtype=torch.bool, device=w.device)
    blocks_cols = block_columns(torch.arange(n_blocks, device=w.device), width).view(n_blocks, width)
    removed, errors, r, step = [], [], 0, max(1, block)
    while len(removed) < k:
        err = _block_errors(w, f, h0, q[:, :r], diag, blocks_cols, alive)
        b = min(step, k - len(removed))
        order = torch.topk(-err, b).indices
        cols = blocks_cols[order].reshape(-1)
        hc = h0[:, cols] - q[:, :r] @ q[cols, :r].T                       # current H⁻¹[:, S]
        while True:
            t = _inverse_root(hc[cols[: b * width]][:, : b * width])      # T Tᵀ = (H⁻¹_SS)⁺
            ws_t = w[:, cols[: b * width]] @ t
            joint = float(f @ ws_t.square().sum(1))
            if not adaptive or b == 1 or joint <= (1 + tol) * float(err[order[:b]].sum()) + 1e-30:
                break
            b = (b + 1) // 2
        take, cols_t, qs = order[:b], cols[: b * width], hc[:, : b * width] @ t
        w -= ws_t @ qs.T                                                   # OBS update of the rest
        w[:, cols_t] = 0
        q[:, r:r + qs.shape[1]] = qs
        r += qs.shape[1]
        diag -= qs.square().sum(1)
        alive[take] = False
        removed += take.tolist()
        errors += err[take].tolist()
        step = min(max(1, block), 2 * b) if adaptive else step
    return removed, errors


def _block_errors(w, f, h0, q, diag, blocks_cols, alive) -> Tensor:
    """tr(W_B (H⁻¹_BB)⁻¹ W_Bᵀ) of every alive block (row-weighted by f; inf for removed ones) under the
    current H⁻¹ = H0 - Q Qᵀ (diag: its diagonal)."""
    err = torch.full(alive.shape, float("inf"), dtype=w.dtype, device=w.device)
    if blocks_cols.shape[1] == 1:
        n = alive.shape[0]
        err[alive] = ((f @ w[:, :n].pow(2)) / diag[:n].clamp_min(1e-30))[alive]
        return err
    bc = blocks_cols[alive]
    qb = q[bc]                                                             # (n, width, r)
    hbb = h0[bc[:, :, None], bc[:, None, :]] - qb @ qb.transpose(1, 2)
    wb = w[:, bc].permute(1, 2, 0)                                         # (n, width, out)
    chol, info = torch.linalg.cholesky_ex(hbb)
    if bool((info == 0).all()):
        err[alive] = (torch.linalg.solve_triangular(chol, wb, upper=False).square() * f).sum((1, 2))
    else:
        err[alive] = torch.einsum("nro,nrs,nso,o->n", wb, torch.linalg.pinv(hbb, hermitian=True), wb, f)
    return err


def _inverse_root(h: Tensor) -> Tensor:
    """T with T Tᵀ = h⁺ for a symmetric PSD h (eigenvalues below pinv's cutoff dropped)."""
    vals, vecs = torch.linalg.eigh(h)
    keep = vals > vals.max().clamp_min(0) * h.shape[0] * torch.finfo(h.dtype).eps
    return vecs[:, keep] / vals[keep].sqrt()
