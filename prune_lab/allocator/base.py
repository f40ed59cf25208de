"""Budget allocators (twin of conf/allocator/*.yaml): unit/layer scores -> PruningPlan.

All take `ratio`, the fraction of decoder attention + MLP parameters to remove.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..adapter import LayerView
from ..errors import BudgetError, PruneLabError
from ..plan import PruningPlan
from ..scores import UnitScores


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores (ties broken by index, so plans are deterministic)."""
    if k <= 0:
        return []
    order = np.lexsort((np.arange(len(scores)), scores.double().cpu().numpy()))
    return sorted(order[:k].tolist())


def take_in_order(cost: np.ndarray, budget: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """Greedy fill in row order: take each unit that still fits the budget (vectorised passes)."""
    chosen = np.zeros(len(cost), dtype=bool)
    allowed = np.ones(len(cost), dtype=bool) if allowed is None else allowed
    left = float(budget)
    while True:
        cand = allowed & ~chosen & (cost <= left)
        new = cand & (np.cumsum(np.where(cand, cost, 0)) <= left)
        if not new.any():
            return chosen
        chosen |= new
        left -= float(cost[new].sum())


def largest_remainder(ideal: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Integer counts close to `ideal` (each <= cap) that add up to `total` where caps allow."""
    counts = np.minimum(np.floor(ideal).astype(int), cap)
    frac = np.where(counts < cap, ideal - counts, -np.inf)
    for i in np.argsort(-frac, kind="stable")[: max(0, total - counts.sum())]:
        if counts[i] < cap[i]:
            counts[i] += 1
    return counts


class Allocator:
    needs_layer_importance = False

    def __init__(self, ratio: float = 0.25, layer_start: int = 0, layer_end: int | None = None):
        if not 0.0 <= ratio < 1.0:
            raise PruneLabError(f"allocator.ratio must be in [0, 1), got {ratio}")
        self.ratio, self.layer_start, self.layer_end = ratio, layer_start, layer_end

    def eligible(self, views: list[LayerView]) -> np.ndarray:
        n = len(views)
        end = n if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= n:
            raise PruneLabError(
                f"layer range [{self.layer_start}, {end}) is outside the model's {n} layers")
        mask = np.zeros(n, dtype=bool)
        mask[self.layer_start:end] = True
        return mask

    def target(self, views: list[LayerView]) -> int:
        return int(round(self.ratio * sum(v.num_params for v in views)))

    def __call__(self, scores: UnitScores, views: list[LayerView],
                 layer_importance: torch.Tensor | None = None) -> PruningPlan:
        raise NotImplementedError


class Uniform(Allocator):
    """The same rate in every eligible layer: whole GQA groups first, MLP channels fill the rest."""

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        eligible = self.eligible(views)
        target = self.target(views)
        layer_target = target / max(1, sum(v.num_params for v, e in zip(views, eligible) if e))
        plan = PruningPlan(target_params=target)
        for v, ok in zip(views, eligible):
            if not ok:
                continue
            a, m = v.attn, v.mlp
            n_groups = min(int(round(layer_target * a.num_kv_heads)), a.num_kv_heads - 1)
            left = layer_target * v.num_params - n_groups * a.group_cost
            n_channels = int(np.clip(round(left / m.channel_cost), 0, m.width - 1))
            plan.attn[v.index] = lowest(scores.attn[v.index], n_groups)
            plan.mlp[v.index] = lowest(scores.mlp[v.index], n_channels)
        return PruningPlan(plan.attn, plan.mlp, [], target)


def parse_distribution(text: str) -> tuple[float, float]:
    parts = str(text).split(":")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise PruneLabError(f"distribution must look like 'x:y' (e.g. 2:8), got '{text}'") from None
    if x < 0 or y < 0 or x + y <= 0 or not np.isfinite(x + y):
        raise PruneLabError(f"distribution '{text}' needs x, y >= 0 and x + y > 0")
    return x / (x + y), y / (x + y)
