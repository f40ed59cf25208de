"""Layer-wise allocation: per-layer rates from layer importance, budget split attention:MLP."""
from __future__ import annotations

import numpy as np
import torch

from ..core.plan import PruningPlan
from ..errors import BudgetError, PruneLabError
from .base import Allocator, largest_remainder, lowest, parse_distribution

STRATEGIES = ("inverse", "proportional", "uniform", "inverse_minmax")


def layer_weights(importance: np.ndarray, eligible: np.ndarray, strategy: str, alpha: float = 1.0,
                  eps: float = 0.01, log_transform: bool = False) -> np.ndarray:
    """Relative pruning weight of each eligible layer (0 elsewhere); rates are proportional to it.

    I = max(importance, 0), optionally log(1 + I) to tame outliers; normalised by its sum over the
    eligible layers (I/ΣI), except inverse_minmax, which scales it to [0, 1]:
      inverse         w = 1/(I/ΣI + eps)^alpha   less important layers lose more
      proportional    w = (I/ΣI + eps)^alpha     more important layers lose more
      uniform         w = 1
      inverse_minmax  w = 1/(minmax(I) + eps)^alpha  a sharp inverse: the most important layer
                      gets 1/(1+eps)^alpha, the least 1/eps^alpha
    """
    imp = np.clip(np.asarray(importance, dtype=float), 0.0, None)
    if log_transform:
        imp = np.log1p(imp)
    sel = imp[eligible]
    if strategy == "inverse_minmax":
        span = sel.max() - sel.min()
        rel = (imp - sel.min()) / span if span > 0 else np.zeros_like(imp)
    else:
        rel = imp / sel.sum() if sel.sum() > 0 else np.full_like(imp, 1.0 / max(len(sel), 1))
    if strategy in ("inverse", "inverse_minmax"):
        w = 1.0 / (rel + eps) ** alpha
    elif strategy == "proportional":
        w = (rel + eps) ** alpha
    else:
        w = np.ones_like(rel)
    return np.where(eligible, w, 0.0)


def solve_rates(weights: np.ndarray, params: np.ndarray, budget: float,
                min_rate: float, max_rate: np.ndarray) -> np.ndarray:
    """Rates r_l = clip(k*w_l, min, max_l) on layers with w_l > 0, with k chosen so Σ r_l·P_l = budget."""
    active = weights > 0
    rates = np.zeros_like(weights, dtype=float)
    if budget <= 0 or not active.any():
        return rates
    w, p, top = weights[active], params[active], max_rate[active]
    if (top * p).sum() < budget - 1e-6:
        raise BudgetError(f"budget of {budget:.0f} params cannot be met on {int(active.sum())} prunable "
                          f"layers with max_rate={top.max():.3g} and one unit kept per layer: "
                          f"lower allocator.ratio or raise max_rate",
                          shortfall=1.0 - float((top * p).sum()) / budget)
    lo, hi = 0.0, top.max() / w.min() + 1.0
    for _ in range(100):   # bisection; removed(k) is monotone in k
        k = (lo + hi) / 2
        removed = (np.clip(k * w, min_rate, top) * p).sum()
        lo, hi = (k, hi) if removed < budget else (lo, k)
    rates[active] = np.clip(hi * w, min_rate, top)
    return rates


class Layerwise(Allocator):
    """Per-layer rates proportional to `layer_weights` of the layer importance (see there).

    Rates r_l = k·w_l (k meets the budget) are clipped to [min_rate, max_rate]; the freeze_top_n
    most important layers and layers outside [layer_start, layer_end) keep everything.
    `distribution` "x:y" splits the parameter budget between attention and MLP.
    """

    needs_layer_importance = True

    def __init__(self, ratio: float = 0.25, strategy: str = "inverse", alpha: float = 1.0,
                 eps: float = 0.01, log_transform: bool = False, min_rate: float = 0.0,
                 max_rate: float = 0.9, freeze_top_n: int = 0, layer_start: int = 0,
                 layer_end: int | None = None, distribution: str = "3:7", multiple_of: int = 1):
        super().__init__(ratio, layer_start, layer_end, multiple_of)
        if strategy not in STRATEGIES:
            raise PruneLabError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
        if not 0 <= min_rate <= max_rate <= 1:
            raise PruneLabError(f"need 0 <= min_rate <= max_rate <= 1, got {min_rate}, {max_rate}")
        if freeze_top_n < 0:
            raise PruneLabError(f"freeze_top_n must be >= 0, got {freeze_top_n}")
        if eps <= 0 and strategy in ("inverse", "inverse_minmax"):
            raise PruneLabError(f"allocator.eps must be > 0 for strategy={strategy}, got {eps}")
        self.strategy, self.alpha, self.eps, self.log_transform = strategy, alpha, eps, log_transform
        self.min_rate, self.max_rate, self.freeze_top_n = min_rate, max_rate, freeze_top_n
        self.attn_share, self.mlp_share = parse_distribution(distribution)

    def layer_weights(self, importance: torch.Tensor, eligible: np.ndarray) -> np.ndarray:
        imp = importance.double().cpu().numpy()
        w = layer_weights(imp, eligible, self.strategy, self.alpha, self.eps, self.log_transform)
        if self.freeze_top_n:
            cand = np.flatnonzero(eligible)
            if self.freeze_top_n >= len(cand):
                raise BudgetError(f"freeze_top_n={self.freeze_top_n} freezes all {len(cand)} prunable layers",
                                  shortfall=1.0)
            w[cand[np.argsort(-imp[cand], kind="stable")[: self.freeze_top_n]]] = 0.0
        return w

    def _allocate(self, weights, views, budget, kind: str) -> dict[int, list[int]]:
        units = [getattr(v, kind) for v in views]
        params = np.array([u.num_params for u in units], dtype=float)
        n_units = np.array([u.num_kv_heads if kind == "attn" else u.width for u in units])
        unit_cost = np.array([u.group_cost if kind == "attn" else u.channel_cost for u in units], float)
        cap = np.where(weights > 0, n_units - 1, 0)
        # a layer keeps at least one unit, so its rate can never reach 1 (e.g. 0.5 with 2 KV heads)
        rates = solve_rates(weights, params, budget, self.min_rate, np.minimum(self.max_rate, cap / n_units))
        total = int(round(budget / unit_cost[weights > 0].mean())) if (weights > 0).any() else 0
        counts = largest_remainder(rates * n_units, min(total, int(cap.sum())), cap)
        return {i: c for i, c in enumerate(counts) if c > 0}

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        if layer_importance is None:
            raise PruneLabError("allocator=layerwise needs layer importance (layer_importance=removal|activation)")
        self.check_inputs(views, scores, layer_importance)
        target = self.target(views)
        weights = self.layer_weights(layer_importance, self.eligible(views))
        attn_counts = self._allocate(weights, views, target * self.attn_share, "attn") if self.attn_share else {}
        attn = {i: lowest(scores.attn[i], c) for i, c in attn_counts.items()}
        attn_removed = sum(len(g) * views[i].attn.group_cost for i, g in attn.items())
        mlp_budget = target - attn_removed if self.mlp_share else 0
        mlp_counts = self._allocate(weights, views, mlp_budget, "mlp") if mlp_budget > 0 else {}
        mlp = {i: lowest(scores.mlp[i], c) for i, c in mlp_counts.items()}
        return self.check_met(PruningPlan(attn, mlp, [], target), views, "lower allocator.ratio or relax "
                              "max_rate, freeze_top_n, the layer range or distribution")
