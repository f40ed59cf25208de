"""Starting points of the search besides the importance's global plan and the uniform shares: the
level database's own errors, allocated greedily — the next level of the part whose output error grows
least per parameter it removes, until the budget is met (absolute errors: the residual stream's
units; relative: each part's error over its dense output energy)."""
from __future__ import annotations

import heapq

import numpy as np

from .budget import Budget
from .levels import Database


def error_seed(db: Database, budget: Budget, relative: bool, rng: np.random.Generator) -> np.ndarray:
    scale = np.ones(len(db.parts)) if relative else np.asarray(db.energy, dtype=float)
    errors = [np.asarray(e, dtype=float) * s for e, s in zip(db.errors, scale)]
    levels = np.zeros(len(db.parts), dtype=int)

    def price(i: int) -> float:
        return (errors[i][levels[i] + 1] - errors[i][levels[i]]) / db.parts[i].step_cost

    heap = [(price(i), i) for i, p in enumerate(db.parts) if p.top > 0]
    heapq.heapify(heap)
    removed = 0
    while heap:
        _, i = heapq.heappop(heap)
        cost = db.parts[i].removed(levels[i] + 1) * db.parts[i].unit_cost - \
            db.parts[i].removed(levels[i]) * db.parts[i].unit_cost
        if removed + cost > budget.target:
            continue
        levels[i] += 1
        removed += cost
        if levels[i] < db.parts[i].top:
            heapq.heappush(heap, (price(i), i))
    return budget.repair(levels, rng)
