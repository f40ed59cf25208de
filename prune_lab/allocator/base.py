"""Budget allocators (twin of conf/allocator/*.yaml): unit/layer scores -> PruningPlan.

All take `ratio`, the fraction of decoder attention + MLP parameters to remove.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..core.adapter import LayerView
from ..core.plan import PruningPlan
from ..core.scores import UnitScores
from ..errors import BudgetError, PruneLabError


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
    """Contract with the recipe: the two `needs_*` flags say which scores __call__ reads,
    `removes_nothing` lets a ratio-0 job skip scoring, `table` is the unit table if one was built;
    `searches`: the plan comes from `search(model, batches, engine, scores, views, run_dir)` (which
    also needs the calibration data and the engine) instead of __call__, with `summary` for metrics."""

    needs_layer_importance = False
    needs_unit_scores = True
    searches = False
    table: pd.DataFrame | None = None

    def __init__(self, ratio: float = 0.25, layer_start: int = 0, layer_end: int | None = None,
                 multiple_of: int = 1):
        if not 0.0 <= ratio < 1.0:
            raise PruneLabError(f"allocator.ratio must be in [0, 1), got {ratio}")
        if multiple_of < 1:
            raise PruneLabError(f"allocator.multiple_of must be >= 1, got {multiple_of}")
        if layer_start < 0 or (layer_end is not None and layer_end <= layer_start):
            raise PruneLabError(f"layer range [{layer_start}, {layer_end}) is empty or negative: "
                                f"need 0 <= allocator.layer_start < allocator.layer_end")
        self.ratio, self.layer_start, self.layer_end = ratio, layer_start, layer_end
        self.multiple_of = multiple_of       # kept widths on multiples of it: applied by align.align_plan

    @property
    def removes_nothing(self) -> bool:
        return self.ratio == 0

    def eligible(self, views: list[LayerView]) -> np.ndarray:
        n = len(views)
        end = n if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= n:
            raise PruneLabError(
                f"layer range [{self.layer_start}, {end}) is outside the model's {n} layers")
        mask = np.zeros(n, dtype=bool)
        mask[self.layer_start:end] = True
        return mask

    def check_calibration(self, n_tokens: int) -> None:
        """Fail before any heavy work when the calibration set is too small for this allocator."""

    def target(self, views: list[LayerView]) -> int:
        return int(round(self.ratio * sum(v.num_params for v in views)))

    @staticmethod
    def check_inputs(views: list[LayerView], scores: UnitScores | None = None,
                     layer_importance: torch.Tensor | None = None) -> None:
        """Scores must be finite and shaped like the model (e.g. not cached for another one)."""
        n = len(views)
        if scores is not None:
            shapes = [(len(a), len(m)) for a, m in zip(scores.attn, scores.mlp)]
            if len(scores.attn) != n or shapes != [(v.attn.num_kv_heads, v.mlp.width) for v in views]:
                raise PruneLabError(f"unit scores (KV groups, MLP channels per layer: {shapes}) do not "
                                    f"match the model's {n} layers")
            scores.check_finite()
        if layer_importance is not None:
            if layer_importance.numel() != n:
                raise PruneLabError(f"layer importance has {layer_importance.numel()} values for {n} layers")
            if not torch.isfinite(layer_importance).all():
                raise PruneLabError("layer importance contains NaN/inf: use model.dtype=bfloat16 or float32")

    @staticmethod
    def check_met(plan: PruningPlan, views: list[LayerView], hint: str) -> PruningPlan:
        """Refuse a plan that falls short of its target by more than one (largest) unit's cost."""
        achieved = plan.params_removed(views)
        slack = max(max(v.attn.group_cost, v.mlp.channel_cost) for v in views)
        if achieved < plan.target_params - slack:
            raise BudgetError(f"budget of {plan.target_params} params cannot be met (reached {achieved}) "
                              f"while every kept layer keeps a KV group and an MLP channel: {hint}",
                              shortfall=1.0 - achieved / max(plan.target_params, 1))
        return plan

    def __call__(self, scores: UnitScores, views: list[LayerView],
                 layer_importance: torch.Tensor | None = None) -> PruningPlan:
        raise NotImplementedError


def parse_distribution(text: str) -> tuple[float, float]:
    parts = str(text).split(":")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise PruneLabError(f"distribution must look like 'x:y' (e.g. 2:8), got '{text}'") from None
    if x < 0 or y < 0 or x + y <= 0 or not np.isfinite(x + y):
        raise PruneLabError(f"distribution '{text}' needs x, y >= 0 and x + y > 0")
    return x / (x + y), y / (x + y)
