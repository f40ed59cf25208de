"""quant=mixed: bits per output channel from its activation-aware score (the math: allocation.py)."""
from __future__ import annotations

from enum import Enum
from types import MappingProxyType

import torch
from torch import Tensor

from ..errors import PruneLabError
from .allocation import (
    SCORES,
    allocate_bits,
    channel_dimensions,
    channel_scores,
    check_allocation,
    check_scoring,
    original_dimensions,
)
from .grid import RowQuantizer, quantize_rtn
from .uniform import Uniform


class Mixed(Uniform):
    """quant=mixed: bits per output channel from its activation-aware score (see allocate_bits).

    The allocation runs over all linears of an engine stage together (their scores are normalised per
    linear), so the average bits hold per stage and hence per layer and for the whole model: every
    allocation meets `target_avg_bits` (budget and quantile to one channel's step; threshold3 as near as its
    scaled thresholds allow; null: quantile's equal shares, threshold3's fixed thresholds), a layer of
    `layer_avg_bits` {layer: bits} its own average instead; `quantiles` are quantile's own cumulative
    boundaries (their average must be the target's, or the target null). `score`: lab (channel_dimensions)
    or original (original_dimensions: the seed's definitions, read per output row)."""

    def __init__(self, bits_options=(2, 3, 4, 6, 8), weights=(0.25, 0.25, 0.15, 0.25, 0.10),
                 allocation: str = "budget", target_avg_bits: float | None = 4.0,
                 thresholds=(0.5, 1.2), sym: bool = True, group_size: int | None = None,
                 act_order: bool = False, score_power: float = 1.0, quantiles=None,
                 layer_avg_bits=MappingProxyType({}), score="lab"):
        score = score.name if isinstance(score, Enum) else score   # the schema's QuantScore, or its name
        if score not in SCORES:
            raise PruneLabError(f"quant.score must be one of {', '.join(SCORES)}, got '{score}'")
        layer_avg_bits = {int(k): float(v) for k, v in (layer_avg_bits or {}).items()}
        quantiles = None if quantiles is None else [float(q) for q in quantiles]
        check_allocation(list(bits_options), list(weights), allocation, target_avg_bits, quantiles, layer_avg_bits)
        check_scoring(list(thresholds), float(score_power))
        super().__init__(int(min(bits_options)), sym, group_size, bits_options, act_order)
        self.weights = torch.tensor([float(w) for w in weights])
        self.allocation, self.target_avg_bits = allocation, target_avg_bits
        self.thresholds, self.score_power = tuple(thresholds), float(score_power)
        self.quantiles, self.layer_avg_bits, self.score = quantiles, layer_avg_bits, score

    def check_model(self, views) -> None:
        """quant.layer_avg_bits names layers the model has (right after loading)."""
        beyond = sorted(k for k in self.layer_avg_bits if k >= len(views))
        if beyond:
            raise PruneLabError(f"quant.layer_avg_bits names layer(s) {beyond}, but the model has {len(views)} "
                                f"layers (0..{len(views) - 1})")

    def target(self, layer: int | None) -> float | None:
        return self.layer_avg_bits.get(layer, self.target_avg_bits)

    def dimensions(self, weight: Tensor, stats, hinv_diag: Tensor, factor_diag: Tensor) -> Tensor:
        """(rows, 5) of one linear under quant.score."""
        if self.score == "original":
            return original_dimensions(weight, stats.mean_abs, stats.var, factor_diag)
        return channel_dimensions(weight, stats.mean_abs, stats.sum_sq / max(stats.count, 1), stats.var, hinv_diag)

    def allocate(self, weights, stats, hinv_diags, layer: int | None = None, factor_diags=None):
        """(bits per path, score range per path) for the linears of one stage of decoder layer `layer`;
        factor_diags: diag(U) of each linear's inverse-Hessian factor (score=original's Hessian)."""
        scores = {p: channel_scores(self.dimensions(w, stats[p], hinv_diags[p], (factor_diags or {}).get(p)),
                                    self.weights).cpu() for p, w in weights.items()}
        flat = torch.cat(list(scores.values()))
        costs = torch.cat([torch.full((w.shape[0],), float(w.shape[1])) for w in weights.values()])
        errors = None
        if self.allocation == "budget":
            errors = torch.cat([self.rtn_errors(w, stats[p]) for p, w in weights.items()])
        bits = allocate_bits(flat, costs, self.bits_options, self.allocation, self.target(layer),
                             self.thresholds, self.score_power, errors, self.quantiles)
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
