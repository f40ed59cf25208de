"""Hardware-aligned widths (allocator.multiple_of): every pruned layer keeps an MLP width that is a
multiple of m, and a query-projection width (kept KV groups x G x head_dim) that is a multiple of m.

A layer the plan leaves untouched keeps its dense width. The aligned plan removes at least the
plan's target and less than one aligned block (m channels, or the fewest KV groups whose
q width is a multiple of m) more: widths are first rounded down to a multiple, then blocks with the
most importance per parameter are given back while the budget stays met.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.adapter import LayerView
from ..core.plan import PruningPlan
from ..core.scores import UnitScores
from ..errors import BudgetError, PruneLabError
from .base import lowest


def group_block(view: LayerView, multiple_of: int) -> int:
    """Fewest KV groups whose query width (groups x G x head_dim) is a multiple of multiple_of."""
    q_width = view.attn.group_size * view.attn.head_dim
    return multiple_of // math.gcd(multiple_of, q_width)


def check_alignment(views: list[LayerView], multiple_of: int) -> None:
    """multiple_of must fit inside every layer's MLP width and query width."""
    if multiple_of < 1:
        raise PruneLabError(f"allocator.multiple_of must be >= 1, got {multiple_of}")
    for v in views:
        q_width = v.attn.num_heads * v.attn.head_dim
        if multiple_of > min(v.mlp.width, q_width):
            raise PruneLabError(f"allocator.multiple_of={multiple_of} is larger than layer {v.index}'s "
                                f"MLP width {v.mlp.width} or query width {q_width}")


def allowed_counts(dense: int, block: int) -> np.ndarray:
    """Kept-unit counts a layer may have: positive multiples of block, and the dense count."""
    return np.unique(np.append(np.arange(block, dense + 1, block), dense))


@dataclass
class Track:
    """One prunable side (attention or MLP) of one layer."""
    layer: int
    kind: str
    cost: int                     # parameters per unit
    kept_value: np.ndarray        # importance kept with the top-c units, c = 0..dense
    allowed: np.ndarray
    pos: int                      # index into allowed of the current kept count

    @property
    def count(self) -> int:
        return int(self.allowed[self.pos])

    def step(self, direction: int) -> tuple[float, int] | None:
        """(importance change, params change) of moving one allowed count down (-1) or up (+1)."""
        new = self.pos + direction
        if not 0 <= new < len(self.allowed):
            return None
        c, c2 = self.count, int(self.allowed[new])
        return float(self.kept_value[c2] - self.kept_value[c]), (c - c2) * self.cost


def tracks_of(plan: PruningPlan, scores: UnitScores, views: list[LayerView], multiple_of: int) -> list[Track]:
    tracks = []
    for kind, removed in (("attn", plan.attn), ("mlp", plan.mlp)):
        for i, idx in removed.items():
            v = views[i]
            s = np.sort(getattr(scores, kind)[i].double().cpu().numpy())[::-1]
            dense, cost = (v.attn.num_kv_heads, v.attn.group_cost) if kind == "attn" else (v.mlp.width,
                                                                                            v.mlp.channel_cost)
            block = group_block(v, multiple_of) if kind == "attn" else multiple_of
            allowed = allowed_counts(dense, block)
            kept = dense - len(idx)
            pos = max(int(np.searchsorted(allowed, kept, side="right")) - 1, 0)   # round down
            tracks.append(Track(i, kind, cost, np.concatenate([[0.0], np.cumsum(s)]), allowed, pos))
    return tracks


def align_plan(plan: PruningPlan, scores: UnitScores, views: list[LayerView], multiple_of: int) -> PruningPlan:
    """The plan with every pruned width on a multiple of `multiple_of` (see the module docstring)."""
    if multiple_of <= 1:
        return plan
    check_alignment(views, multiple_of)
    tracks = tracks_of(plan, scores, views, multiple_of)
    whole = PruningPlan(layers=plan.layers, attn_blocks=plan.attn_blocks, mlp_blocks=plan.mlp_blocks)
    removed_layers = whole.params_removed(views)       # whole layers and emptied blocks: nothing to align
    base = {(t.layer, t.kind): t for t in tracks}

    def removed() -> int:
        return removed_layers + sum((t.allowed[-1] - t.count) * t.cost for t in base.values())

    target = plan.target_params
    while removed() < target:        # rounding down fell short: cut the cheapest further block
        moves = [(-(d[0]) / d[1], k) for k, t in base.items() if (d := t.step(-1)) is not None]
        if not moves:
            raise BudgetError(f"budget of {target} params cannot be met with widths that are multiples of "
                              f"{multiple_of}: lower allocator.multiple_of or allocator.ratio")
        base[min(moves)[1]].pos -= 1
    while True:                      # give back the most valuable blocks the budget allows
        slack = removed() - target
        moves = [(d[0] / -d[1], k) for k, t in base.items()
                 if (d := t.step(+1)) is not None and -d[1] <= slack]
        if not moves:
            break
        base[max(moves)[1]].pos += 1
    attn = {t.layer: lowest(scores.attn[t.layer], t.allowed[-1] - t.count) for t in tracks if t.kind == "attn"}
    mlp = {t.layer: lowest(scores.mlp[t.layer], t.allowed[-1] - t.count) for t in tracks if t.kind == "mlp"}
    return PruningPlan(attn, mlp, plan.layers, target, plan.attn_blocks, plan.mlp_blocks)
