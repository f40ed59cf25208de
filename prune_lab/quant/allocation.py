"""Activation-aware mixed precision: the five importance dimensions of each output channel, their
weighted score, and the allocation of bit widths to channels (quantile, budget, threshold3).
Pure tensor code."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import PruneLabError
from .grid import check_bits_options

DIMENSIONS = ("activation", "hessian", "weight", "output", "stability")
ALLOCATIONS = ("quantile", "budget", "threshold3")


def channel_dimensions(weight: Tensor, mean_abs: Tensor, mean_sq: Tensor, var: Tensor,
                       hinv_diag: Tensor) -> Tensor:
    """(rows, 5) importance of each output channel along the five dimensions, each normalised to
    mean 1 over the rows: activation mean|x| (Σ|W|·E|x| / in), Hessian W²/diag(H⁻¹) (OBS saliency,
    mean over inputs), weight mean|W|, output sensitivity sqrt(W²·E[x²]), activation stability
    sqrt(W²·var(x))."""
    w = weight.float()
    a, w2 = w.abs(), w.square()
    dims = torch.stack([
        a @ mean_abs.float() / w.shape[1],
        (w2 / hinv_diag.float().clamp_min(1e-12)).mean(1),
        a.mean(1),
        (w2 @ mean_sq.float()).sqrt(),
        (w2 @ var.float().clamp_min(0)).sqrt(),
    ], dim=1)
    return dims / dims.mean(0, keepdim=True).clamp_min(1e-12)


def channel_scores(dims: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of the normalised dimensions; weights are normalised to sum 1 (score mean 1)."""
    return dims @ (weights.to(dims) / weights.sum())


def check_allocation(bits_options, weights, allocation: str, target_avg_bits: float | None) -> None:
    """Configuration errors, raised when the quantizer is built (before any heavy work)."""
    check_bits_options(bits_options)
    if len(weights) != len(DIMENSIONS) or any(not 0 <= w < math.inf for w in weights) or sum(weights) <= 0:
        raise PruneLabError(f"quant.weights must be {len(DIMENSIONS)} non-negative numbers "
                            f"({'/'.join(DIMENSIONS)}) with a positive sum, got {list(weights)}")
    if allocation not in ALLOCATIONS:
        raise PruneLabError(f"quant.allocation must be one of {', '.join(ALLOCATIONS)}, got '{allocation}'")
    if allocation == "threshold3" and not {2, 4, 8} <= set(bits_options):
        raise PruneLabError(f"quant.allocation=threshold3 needs 2, 4 and 8 in quant.bits_options, "
                            f"got {list(bits_options)}")
    if allocation == "budget":
        lo, hi = min(bits_options), max(bits_options)
        if target_avg_bits is None or not lo <= target_avg_bits <= hi:
            raise PruneLabError(f"quant.target_avg_bits={target_avg_bits} is outside "
                                f"[{lo}, {hi}], the range of quant.bits_options")


def check_scoring(thresholds, score_power: float) -> None:
    """quant.thresholds (threshold3: [low, high], low <= high) and quant.score_power (budget: a finite
    exponent >= 0) -- a NaN or a reversed pair would silently ignore the scores."""
    if len(thresholds) != 2 or not all(math.isfinite(t) for t in thresholds) or thresholds[0] > thresholds[1]:
        raise PruneLabError(f"quant.thresholds must be two finite scores [low, high] with low <= high, "
                            f"got {list(thresholds)}")
    if not 0 <= score_power < math.inf:
        raise PruneLabError(f"quant.score_power must be a finite exponent >= 0, got {score_power}")


def allocate_bits(scores: Tensor, costs: Tensor, options, allocation: str,
                  target_avg_bits: float | None = None, thresholds=(0.5, 1.2), power: float = 1.0,
                  errors: Tensor | None = None) -> Tensor:
    """Bits per channel from its score; `costs` = weights per channel (the average is over weights).

    quantile: equal shares of the weights per option by score quantile (average = mean of options);
    budget: average exactly target_avg_bits (within one channel's smallest step), minimising
    Σ score^power · error(bits) where error is `errors` (channels × options, e.g. the measured
    quantization error of each channel at each option) or, without it, costs · 4^(−bits): higher
    scores get more bits; threshold3: 2 / 4 / 8 bits below / between / above the two thresholds.
    """
    opts = torch.tensor(sorted(options), dtype=torch.float64)
    s, c = scores.double().cpu(), costs.double().cpu()
    if allocation == "threshold3":
        lo, hi = thresholds
        raw = scores.cpu()                                  # compare in the scores' own precision
        bits = torch.where(raw < lo, 2.0, torch.where(raw <= hi, 4.0, 8.0)).double()
    elif allocation == "quantile":
        order = s.argsort()
        share = (c[order].cumsum(0) - c[order] / 2) / c.sum()     # cumulative weight share, midpoint
        idx = torch.empty_like(order)
        idx[order] = (share * len(opts)).long().clamp(max=len(opts) - 1)
        bits = opts[idx]
    else:
        err = errors.double().cpu() if errors is not None else c[:, None] * 4.0 ** (-opts)[None, :]
        bits = opts[_budget(s.clamp_min(1e-12)[:, None] ** power * err, c, opts, float(target_avg_bits))]
    return bits.to(torch.int64)


def _budget(loss: Tensor, c: Tensor, opts: Tensor, target: float) -> Tensor:
    """Option index per channel minimising Σ loss[channel, option] subject to Σ c·bits = target·Σ c:
    bisection on the Lagrange multiplier, then a greedy fill of the remainder with the best
    loss-decrease-per-bit upgrades that still fit."""
    budget, rows = target * c.sum(), torch.arange(len(c))

    def assign(lam: float) -> Tensor:
        return (loss + lam * c[:, None] * opts[None, :]).argmin(1)

    lo, hi = 1e-30, float(loss.max() / c.min()) + 1.0    # lo: every channel at max bits; hi: at min
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        if (c * opts[assign(mid)]).sum() > budget:
            lo = mid
        else:
            hi = mid
    idx, above = assign(hi), assign(lo)
    # channels tied at the multiplier: upgrade those gaining most while the budget allows
    tied = (above != idx).nonzero().squeeze(1)
    gain = (loss[tied, idx[tied]] - loss[tied, above[tied]]) / ((opts[above[tied]] - opts[idx[tied]]) * c[tied])
    tied = tied[gain.argsort(descending=True)]
    fits = ((opts[above[tied]] - opts[idx[tied]]) * c[tied]).cumsum(0) <= budget - (c * opts[idx]).sum()
    idx[tied[fits]] = above[tied[fits]]
    left = budget - (c * opts[idx]).sum()
    tol = 1e-9 * budget
    for _ in range(len(c) * len(opts)):
        nxt = (idx + 1).clamp(max=len(opts) - 1)
        step = (opts[nxt] - opts[idx]) * c
        gain = (loss[rows, idx] - loss[rows, nxt]) / step.clamp_min(1e-12)
        gain[(nxt == idx) | (step > left + tol)] = -1
        best = int(gain.argmax())
        if gain[best] < 0:
            break
        idx[best], left = nxt[best], left - step[best]
    return idx
