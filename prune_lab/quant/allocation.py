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
SCORES = ("lab", "original")


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


def original_column_dimensions(weight: Tensor, mean_abs: Tensor, var: Tensor, factor_diag: Tensor) -> Tensor:
    """(cols, 5): the original's (seed SparseGPT-enhanced) five dimensions, per *input column* j as it
    defined them, each divided by (its mean + 1e-8): activation a_j = mean|x_j|, Hessian |U_jj| (the
    diagonal of the upper Cholesky factor U of (H + λI)⁻¹, which its code calls Hinv), weight mean_i|W_ij|,
    output sqrt(mean_i W_ij²·a_j²), stability var(x_j). (Its a_j and var(x_j) were an EMA, α = 0.5, of
    per-batch figures; here the exact means over every calibration token.)"""
    w, a = weight.float(), mean_abs.float()
    dims = torch.stack([a, factor_diag.float().abs(), w.abs().mean(0),
                        (w.square() * a.square()[None, :]).mean(0).sqrt(), var.float()], dim=1)
    return dims / (dims.mean(0, keepdim=True) + 1e-8)


def original_dimensions(weight: Tensor, mean_abs: Tensor, var: Tensor, factor_diag: Tensor) -> Tensor:
    """(rows, 5): quant.score=original, the original's definitions read per output row (the lab's unit of
    bits; the original gave each input column its bits): weight mean_j|W_ij| and output
    sqrt(mean_j W_ij²·a_j²) (its formulas with the roles of rows and columns swapped); activation mean|x|,
    Hessian |U_jj| and stability var(x) describe the inputs, which every row of a linear shares, so per row
    they are one value each and normalise to 1 (a constant in the score). Normalised as the original."""
    w, a = weight.float(), mean_abs.float()
    ones = torch.ones(w.shape[0], device=w.device)
    rows = torch.stack([w.abs().mean(1), (w.square() * a.square()[None, :]).mean(1).sqrt()], dim=1)
    rows = rows / (rows.mean(0, keepdim=True) + 1e-8)
    shared = original_column_dimensions(weight, mean_abs, var, factor_diag)[:, [0, 1, 4]].mean(0)
    return torch.stack([ones * shared[0], ones * shared[1], rows[:, 0], rows[:, 1], ones * shared[2]], dim=1)


def channel_scores(dims: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of the normalised dimensions; weights are normalised to sum 1 (score mean 1)."""
    return dims @ (weights.to(dims) / weights.sum())


def check_allocation(bits_options, weights, allocation: str, target_avg_bits: float | None,
                     quantiles=None, layer_avg_bits=None) -> None:
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
    lo, hi = (2, 8) if allocation == "threshold3" else (min(bits_options), max(bits_options))
    targets = {"quant.target_avg_bits": target_avg_bits,
               **{f"quant.layer_avg_bits.{k}": v for k, v in (layer_avg_bits or {}).items()}}
    for key, value in targets.items():
        if (value is None and key == "quant.target_avg_bits" and allocation == "budget") or \
                (value is not None and not lo <= value <= hi):
            what = "the range threshold3's 2 / 4 / 8 bits can meet" if allocation == "threshold3" else \
                "the range of quant.bits_options"
            raise PruneLabError(f"{key}={value} is outside [{lo}, {hi}], {what}")
    if any(int(k) < 0 for k in layer_avg_bits or {}):
        raise PruneLabError(f"quant.layer_avg_bits keys are layer indices >= 0, got {dict(layer_avg_bits)}")
    if quantiles is not None:
        if allocation != "quantile":
            raise PruneLabError(f"quant.quantiles sets quant.allocation=quantile's boundaries, "
                                f"not {allocation}'s: drop it or set quant.allocation=quantile")
        q = list(quantiles)
        if len(q) != len(bits_options) - 1 or any(not 0 <= a <= b <= 1 for a, b in zip([0, *q], [*q, 1])):
            raise PruneLabError(f"quant.quantiles must be {len(bits_options) - 1} non-decreasing cumulative "
                                f"weight shares in [0, 1] (one boundary between each pair of bits_options), got {q}")
        implied = implied_average(bits_options, q)
        for key, value in targets.items():
            if value is not None and abs(implied - value) > 0.01:
                raise PruneLabError(f"quant.quantiles {q} give {implied:.3f} bits on average, not {key}={value}: "
                                    f"set {key}=null (or {implied:.3f})")


def implied_average(options, quantiles) -> float:
    """The average bits of cumulative boundaries `quantiles` over the sorted options."""
    bounds = [0.0, *quantiles, 1.0]
    return sum(b * (bounds[i + 1] - bounds[i]) for i, b in enumerate(sorted(options)))


def quantile_shares(opts: Tensor, target: float | None, quantiles=None) -> Tensor:
    """Weight share of each (ascending) option: the given boundaries, equal shares (target None), or
    shares tilted towards the low or high options, w_i ∝ exp(θ·b_i) with θ by bisection so that
    Σ w_i·b_i = target: the quantile boundaries shift, the order by score is kept."""
    if quantiles is not None:
        return torch.tensor([0.0, *quantiles, 1.0], dtype=torch.float64).diff()
    if target is None:
        return torch.full_like(opts, 1 / len(opts))
    if target <= opts[0] or target >= opts[-1]:
        return (opts == (opts[0] if target <= opts[0] else opts[-1])).double()
    lo, hi = -60.0 / float(opts[-1]), 60.0 / float(opts[-1])
    for _ in range(200):
        mid = (lo + hi) / 2
        w = (mid * opts).softmax(0)
        lo, hi = (mid, hi) if (w * opts).sum() < target else (lo, mid)
    return (hi * opts).softmax(0)


def scaled_thresholds(raw: Tensor, c: Tensor, thresholds, target: float) -> tuple[float, float]:
    """threshold3 at an average: both thresholds times one factor (bisection in log space), the one
    whose average is nearest the target."""
    def avg(f: float) -> float:
        bits = torch.where(raw < thresholds[0] * f, 2.0, torch.where(raw <= thresholds[1] * f, 4.0, 8.0)).double()
        return float((bits * c).sum() / c.sum())
    lo, hi = -30.0, 30.0                                      # log factor: more bits at lo
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(math.exp(mid)) > target else (lo, mid)
    f = min((math.exp(lo), math.exp(hi)), key=lambda f: abs(avg(f) - target))
    return thresholds[0] * f, thresholds[1] * f


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
                  errors: Tensor | None = None, quantiles=None) -> Tensor:
    """Bits per channel from its score; `costs` = weights per channel (the average is over weights).

    quantile: shares of the weights per option by score quantile — `quantiles` (cumulative boundaries),
    or shifted to average target_avg_bits (quantile_shares), or equal (target None: the mean of options);
    budget: average exactly target_avg_bits (within one channel's smallest step), minimising
    Σ score^power · error(bits) where error is `errors` (channels × options, e.g. the measured
    quantization error of each channel at each option) or, without it, costs · 4^(−bits): higher
    scores get more bits; threshold3: 2 / 4 / 8 bits below / between / above the two thresholds (both
    scaled by one factor to average target_avg_bits when it is set).
    """
    opts = torch.tensor(sorted(options), dtype=torch.float64)
    s, c = scores.double().cpu(), costs.double().cpu()
    if allocation == "threshold3":
        raw = scores.cpu()                                  # compare in the scores' own precision
        lo, hi = thresholds if target_avg_bits is None else scaled_thresholds(raw, c, thresholds, target_avg_bits)
        bits = torch.where(raw < lo, 2.0, torch.where(raw <= hi, 4.0, 8.0)).double()
    elif allocation == "quantile":
        order = s.argsort()
        share = (c[order].cumsum(0) - c[order] / 2) / c.sum()     # cumulative weight share, midpoint
        bounds = quantile_shares(opts, target_avg_bits, quantiles).cumsum(0)[:-1]
        idx = torch.empty_like(order)
        idx[order] = torch.searchsorted(bounds, share, right=True).clamp(max=len(opts) - 1)
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
