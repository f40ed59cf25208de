"""SparseGPT's OBS column sweep fused with GPTQ quantization (pure tensor code on one weight matrix).

Conventions: W is (rows = output channels, cols = input features); H = 2·X·Xᵀ over the calibration
tokens (cols × cols); masks are bool with True = weight kept.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PruneLabError
from ..quant.grid import RowQuantizer, quantize
from .masks import SparsitySpec, lowest_mask, nm_mask


def inverse_hessian_factor(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (λ = damp·mean diag H), and the dead-input mask.

    Inputs that never fire (diag H = 0) get H_ii = 1, so their weights are simply zeroed."""
    h = hessian.double().clone()
    if not torch.isfinite(h).all():
        raise PruneLabError("the Hessian (calibration inputs of a layer) contains NaN/inf: the layers before "
                            "it diverged (fp16 overflow? use model.dtype=bfloat16 or float32)")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.diag(h).mean()
    try:
        chol = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(chol)
        upper = torch.linalg.cholesky(hinv, upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise PruneLabError(f"the Hessian is not positive definite even with method.damp={damp}: "
                            f"raise method.damp or the calibration size") from e
    return upper, dead


def asymmetric_target(weight: Tensor, stats, factor: tuple[Tensor, Tensor], alpha: float = 1.0) -> Tensor:
    """W0 = W + α·(W·(C − G) + R)·(G + λI)⁻¹: with α = 1 the weight whose outputs on the pruned-path
    inputs X~ best match the dense outputs W·X (GPTAQ's asymmetric calibration, Li et al. 2025),
    ridge-regularised towards W with the sweep's own damping (W0 == W exactly when X~ == X and R = 0);
    α < 1 takes that fraction of the correction (GPTAQ's own default is α = 0.25).

    W·C with C = X·X~ᵀ (stats.w_cross), G = X~·X~ᵀ (stats.gram), R = Σ (h − h~)·x~ᵀ (stats.resid_cross, the
    residual-stream drift where the output lands; None = not absorbed). Since W0·X~ is the projection
    of W·X (+ drift) onto the row space of X~, ‖W·X − W'·X~‖² = const + ‖(W0 − W')·X~‖²: the OBS sweep
    run on W0 with H = 2·G minimises the asymmetric objective. `factor` = inverse_hessian_factor of
    H = 2·G/n, whose U gives (H + λI)⁻¹ = UᵀU."""
    u = factor[0].double()
    rhs = stats.w_cross(weight) - weight.double() @ stats.gram.double()
    if stats.resid_cross is not None:
        rhs = rhs + stats.resid_cross.double().to(rhs.device)
    rhs = rhs * (2.0 * alpha / max(stats.count, 1))
    return (weight.double() + (rhs @ u.T) @ u).to(weight.dtype)


@torch.no_grad()
def obs_sweep(weight: Tensor, hessian: Tensor, spec: SparsitySpec, *, blocksize: int = 128,
              damp: float = 0.01, quantizer: RowQuantizer | None = None,
              fixed_mask: Tensor | None = None, factor: tuple[Tensor, Tensor] | None = None,
              act_order: bool = False) -> tuple[Tensor, Tensor, float]:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) with optional GPTQ quantization in the same sweep.

    Columns are visited left to right in blocks of `blocksize`. At the start of each block the mask of
    the block is chosen by the OBS saliency w² / [U]_jj² (adaptive mask selection; per M-group for
    N:M when the sweep reaches the group), each column is then pruned and/or quantized, and its error,
    divided by U_jj, is spread onto the block's later columns through row j of U (in-block, eagerly)
    and onto the later blocks once per block (lazy batched update). `fixed_mask` replaces the mask
    selection (quantize a model pruned elsewhere, keeping its zeros); `factor` is a precomputed
    inverse_hessian_factor(hessian, damp). act_order: visit the columns by decreasing diag(H) (GPTQ's
    activation order; quantization groups stay the original column ranges, their scales computed
    before the sweep, i.e. llm-compressor's "static" order). The loop over the columns of a
    block is the algorithm's sequential dependency; every step is vectorised over rows.

    Computes in fp32 (fp64 for an fp64 weight). Returns (new weight in the input dtype, keep-mask,
    OBS loss Σ (w − q)² / U_jj² / 2).
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w_all = weight.detach().to(work).clone()
    rows, cols = w_all.shape
    spec.check_width(cols, blocksize if spec.nm else None)
    if act_order and spec.nm and fixed_mask is None:
        raise PruneLabError("quant.act_order reorders columns, so it cannot choose N:M masks (use method=wanda|magnitude)")
    perm = torch.argsort(torch.diag(hessian), descending=True).to(w_all.device) if act_order else None
    if perm is not None:
        hessian, factor = hessian[perm][:, perm], None
    hinv, dead = factor if factor is not None else inverse_hessian_factor(hessian.to(w_all.device), damp)
    hinv = hinv.to(work)
    static = None
    if perm is not None:
        dead = dead[torch.argsort(perm)]                      # back to the original column order
        w_all[:, dead] = 0
        if fixed_mask is not None:
            w_all[~fixed_mask] = 0
        if quantizer is not None and quantizer.group_size:
            static = _static_group_params(w_all, quantizer, perm)
        w_all, dead = w_all[:, perm], dead[perm]
        fixed_mask = fixed_mask[:, perm] if fixed_mask is not None else None
    w_all[:, dead] = 0
    if fixed_mask is not None:
        w_all[~fixed_mask] = 0
    mask = torch.ones_like(w_all, dtype=torch.bool)
    params = quantizer.params(w_all) if quantizer is not None and not quantizer.group_size else None
    loss = torch.zeros((), dtype=torch.float64, device=w_all.device)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1, hinv1 = w_all[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        err1 = torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if fixed_mask is not None:
            mask1 = fixed_mask[:, b0:b1].clone()
        elif spec.active and not spec.nm:
            mask1 = lowest_mask(w1.square() / d.square()[None, :], spec.sparsity, dim=None)
        else:
            mask1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(b1 - b0):
            col = b0 + i
            if spec.nm and fixed_mask is None and i % spec.prune_m == 0:
                mask1[:, i:i + spec.prune_m] = nm_mask(
                    w1[:, i:i + spec.prune_m].square() / d[i:i + spec.prune_m].square()[None, :],
                    spec.prune_n, spec.prune_m)
            if static is not None:
                params = (static[0][:, col:col + 1], static[1][:, col:col + 1], static[2])
            elif quantizer is not None and quantizer.group_size and col % quantizer.group_size == 0:
                ahead = torch.cat([w1[:, i:], w_all[:, b1:]], dim=1)[:, :quantizer.group_size]
                params = quantizer.params(ahead)
            w = w1[:, i]
            q = torch.where(mask1[:, i], w, torch.zeros_like(w))
            if params is not None:
                q = quantize(q[:, None], *params).squeeze(1) * mask1[:, i]
            e = (w - q) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        loss += err1.double().square().sum() / 2
        w_all[:, b0:b1] = w1
        mask[:, b0:b1] = mask1
        w_all[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if perm is not None:
        inverse = torch.argsort(perm)
        w_all, mask = w_all[:, inverse], mask[:, inverse]
    return w_all.to(weight.dtype), mask, float(loss)


def _static_group_params(w: Tensor, quantizer: RowQuantizer, perm: Tensor):
    """Per visited column (permuted order): the (scale, zero) of its original group, from `w`."""
    gs = quantizer.group_size
    groups = [quantizer.params(w[:, c:c + gs]) for c in range(0, w.shape[1], gs)]
    scale = torch.cat([g[0] for g in groups], dim=1).repeat_interleave(gs, dim=1)[:, :w.shape[1]]
    zero = torch.cat([g[1] for g in groups], dim=1).repeat_interleave(gs, dim=1)[:, :w.shape[1]]
    return scale[:, perm], zero[:, perm], groups[0][2]
