"""From the search's levels to plans and back: a plan snapped onto the ladder (the seeds), the units
removed per layer (metrics), and the final plan of a candidate (the database's greedy units, the
budget made exact with single MLP channels unless the shape must stay uniform, removed layers)."""
from __future__ import annotations

import numpy as np

from ...core.plan import PruningPlan
from .budget import Budget
from .levels import Database


def snap(plan: PruningPlan, budget: Budget, rng) -> np.ndarray:
    """A plan's counts rounded onto the ladder (its removed layers and blocks at their drop level), then repaired."""
    counts = [len((plan.attn if p.kind == "attn" else plan.mlp).get(p.layer, [])) for p in budget.parts]
    levels = np.array([min(p.top, int(round(c / p.step))) for p, c in zip(budget.parts, counts)])
    for i, p in enumerate(budget.parts):     # the layers and blocks the plan removes whole
        gone = plan.layers + (plan.attn_blocks if p.kind == "attn" else plan.mlp_blocks)
        if p.layer in gone and budget.partner[i] >= 0 and levels[i] <= budget.top[i]:
            budget.drop(levels, i)
    return budget.repair(levels, rng)


def counts_of(plan: PruningPlan, parts) -> dict:
    """Units a plan removes per layer, by kind."""
    return {kind: [len((plan.attn if kind == "attn" else plan.mlp).get(p.layer, [])) for p in parts if p.kind == kind]
            for kind in ("attn", "mlp")}


def by_layer(parts, levels) -> dict:
    """Units the levels remove per layer, by kind."""
    return {kind: [int(p.removed(int(lv))) for p, lv in zip(parts, levels) if p.kind == kind]
            for kind in ("attn", "mlp")}


def to_plan(db: Database, levels: np.ndarray, target: int, adjust: bool = True) -> PruningPlan:
    """Units of every part's level (the database's greedy order), the budget then made exact to half
    an MLP channel by single channels spread round-robin over the parts already pruned most. A part at
    its drop level goes whole: plan.attn_blocks / mlp_blocks, both of a layer = the layer removed."""
    parts = db.parts
    counts = [p.removed(int(lv)) for p, lv in zip(parts, levels)]
    gone = [p.droppable and lv > p.top for p, lv in zip(parts, levels)]
    blocks = {kind: [p.layer for p, g in zip(parts, gone) if g and p.kind == kind] for kind in ("attn", "mlp")}
    left = target - sum(c * p.unit_cost for c, p in zip(counts, parts))
    mlp = [] if not adjust else \
        sorted((i for i, p in enumerate(parts) if p.kind == "mlp" and p.searchable and not gone[i]),
               key=lambda i: (-counts[i], i))
    turn = 0
    while mlp and abs(left) >= parts[mlp[0]].unit_cost / 2:
        d = 1 if left > 0 else -1
        free = [i for i in mlp if 0 <= counts[i] + d <= parts[i].units - 1]
        if not free:
            break
        i = free[turn % len(free)]
        turn += 1
        counts[i] += d
        left -= d * parts[i].unit_cost
    attn, mlp_units = {}, {}
    for p, c, order, g in zip(parts, counts, db.order, gone):
        if c and not g:
            ranked = list(order) + [u for u in range(p.units) if u not in set(order)]
            (attn if p.kind == "attn" else mlp_units)[p.layer] = ranked[:c]
    return PruningPlan(attn, mlp_units, [], target, blocks["attn"], blocks["mlp"])
