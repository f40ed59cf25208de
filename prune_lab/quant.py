"""Weight quantization math (twin of conf/quant/*.yaml): min-max quantizer with per-row bit widths,
and the activation-aware mixed-precision allocation of bits to output channels.

Pure tensor code; the GPTQ error feedback that uses the quantizer lives in sparsegpt.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PruneLabError

DIMENSIONS = ("activation", "hessian", "weight", "output", "stability")
ALLOCATIONS = ("quantile", "budget", "threshold3")


@dataclass
class RowQuantizer:
    """Min-max quantizer of a weight matrix with one bit width per output row (channel).

    sym: symmetric grid around 0 (zero point 2^(b-1)); else asymmetric min-max with an integer zero
    point. group_size: scales per group of that many input columns (None = one per row).
    """
    bits: Tensor                      # (rows,) integer bit widths
    sym: bool = True
    group_size: int | None = None

    def params(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, zero, maxq), each (rows, 1), from the columns `w` (rows, cols) of one group."""
        maxq = (2 ** self.bits.to(w.device, torch.float32) - 1)[:, None]
        xmin = w.min(1).values.clamp(max=0)
        xmax = w.max(1).values.clamp(min=0)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        empty = (xmax - xmin) == 0
        xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
        scale = ((xmax - xmin)[:, None] / maxq)
        zero = (maxq + 1) / 2 if self.sym else torch.round(-xmin[:, None] / scale)
        return scale, zero, maxq


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: Tensor) -> Tensor:
    """Round `w` onto the grid scale·(q − zero), q ∈ {0..maxq}; 0 maps to exactly 0."""
    q = torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), maxq)
    return scale * (q - zero)


def quantize_rtn(w: Tensor, quantizer: RowQuantizer) -> Tensor:
    """Round-to-nearest of a whole matrix (no error feedback), group by group."""
    gs = quantizer.group_size or w.shape[1]
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], gs):
        out[:, c:c + gs] = quantize(w[:, c:c + gs], *quantizer.params(w[:, c:c + gs]))
    return out


# ---- activation-aware importance of output channels -----------------------------------------
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
    if not bits_options or any(int(b) != b or not 1 <= b <= 16 for b in bits_options):
        raise PruneLabError(f"quant.bits_options must be integers in [1, 16], got {list(bits_options)}")
    if len(weights) != len(DIMENSIONS) or any(w < 0 for w in weights) or sum(weights) <= 0:
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


def bit_histogram(bits: Tensor, options) -> dict[str, int]:
    return {str(int(b)): int((bits == b).sum()) for b in sorted(options)}


# ---- the quant config group's components ----------------------------------------------------
class NoQuant:
    """quant=none: weights stay in the model's float dtype."""

    enabled = False
    act_order = False
    sym = group_size = None          # quant=none: no quantizer settings (recorded as null)

    def allocate(self, weights: dict, stats: dict, hinv_diags: dict) -> tuple[dict, dict]:
        return {}, {}

    def quantizer(self, bits: Tensor | None) -> RowQuantizer | None:
        return None


class Uniform(NoQuant):
    """quant=uniform: one bit width for every output channel (GPTQ when run in the sweep)."""

    enabled = True

    def __init__(self, bits: int = 4, sym: bool = True, group_size: int | None = None,
                 bits_options=(2, 3, 4, 6, 8), act_order: bool = False):
        if bits not in bits_options:
            raise PruneLabError(f"quant.bits={bits} is not one of quant.bits_options {list(bits_options)}")
        if group_size is not None and group_size < 1:
            raise PruneLabError(f"quant.group_size must be a positive number of columns or null, got {group_size}")
        self.bits, self.sym, self.group_size, self.act_order = bits, sym, group_size, act_order
        self.bits_options = sorted(int(b) for b in bits_options)

    def allocate(self, weights, stats, hinv_diags):
        return {p: torch.full((w.shape[0],), self.bits, dtype=torch.int64) for p, w in weights.items()}, {}

    def quantizer(self, bits):
        return RowQuantizer(bits, self.sym, self.group_size)


class Mixed(Uniform):
    """quant=mixed: bits per output channel from its activation-aware score (see allocate_bits).

    The allocation runs over all linears of an engine stage together (their scores are normalised per
    linear), so `budget` holds per stage and hence for the whole model."""

    def __init__(self, bits_options=(2, 3, 4, 6, 8), weights=(0.25, 0.25, 0.15, 0.25, 0.10),
                 allocation: str = "budget", target_avg_bits: float | None = 4.0,
                 thresholds=(0.5, 1.2), sym: bool = True, group_size: int | None = None,
                 act_order: bool = False, score_power: float = 1.0):
        check_allocation(list(bits_options), list(weights), allocation, target_avg_bits)
        super().__init__(int(min(bits_options)), sym, group_size, bits_options, act_order)
        self.weights = torch.tensor([float(w) for w in weights])
        self.allocation, self.target_avg_bits = allocation, target_avg_bits
        self.thresholds, self.score_power = tuple(thresholds), float(score_power)

    def allocate(self, weights, stats, hinv_diags):
        """(bits per path, score range per path) for the linears of one stage."""
        scores = {p: channel_scores(channel_dimensions(w, stats[p].mean_abs, stats[p].sum_sq / max(stats[p].count, 1),
                                                       stats[p].var, hinv_diags[p]), self.weights).cpu()
                  for p, w in weights.items()}
        flat = torch.cat(list(scores.values()))
        costs = torch.cat([torch.full((w.shape[0],), float(w.shape[1])) for w in weights.values()])
        errors = None
        if self.allocation == "budget":
            errors = torch.cat([self.rtn_errors(w, stats[p]) for p, w in weights.items()])
        bits = allocate_bits(flat, costs, self.bits_options, self.allocation, self.target_avg_bits,
                             self.thresholds, self.score_power, errors)
        out = dict(zip(scores, bits.split([len(s) for s in scores.values()])))
        ranges = {p: (float(s.min()), float(s.max())) for p, s in scores.items()}
        return out, ranges

    def rtn_errors(self, weight: Tensor, stats) -> Tensor:
        """(rows, options): Σ_i E[x_i²]·(w − Q_b(w))² per row at each bit option (the layer loss of
        round-to-nearest under a diagonal Hessian), relative to the linear's Σ_i E[x_i²]·w² so that
        linears of different scales compare."""
        w = weight.float()
        h = (stats.sum_sq / max(stats.count, 1)).to(w.device).float()
        rows = w.shape[0]
        err = torch.stack([((w - quantize_rtn(w, RowQuantizer(torch.full((rows,), b), self.sym, self.group_size)))
                            .square() @ h) for b in self.bits_options], dim=1)
        return (err / (w.square() @ h).sum().clamp_min(1e-30)).cpu()
