"""The parameter budget over the level ladder: a candidate (one level per part) is feasible when it
removes at most the target and at most one step less (the largest level step of any part), so that
candidates compare at (almost) the same size; the plan is then made exact with single MLP channels."""
from __future__ import annotations

import numpy as np

from .levels import Part, removed_params


class Budget:
    def __init__(self, parts: list[Part], target: int):
        self.parts, self.target = parts, int(target)
        self.top = np.array([p.top for p in parts])
        self.slack = max(p.step_cost for p in parts if p.top > 0)

    def params(self, levels: np.ndarray) -> int:
        return removed_params(self.parts, levels)

    def feasible(self, levels: np.ndarray) -> bool:
        return -self.slack <= self.params(levels) - self.target <= 0

    def repair(self, levels: np.ndarray, rng: np.random.Generator, keep=None) -> np.ndarray:
        """Random single-level moves (never undoing the parts in `keep`: an index or a list of them)
        until the budget holds; in place."""
        keep = np.atleast_1d(np.asarray([] if keep is None else keep, dtype=int))
        for _ in range(100 * len(levels)):
            over = self.params(levels) - self.target
            if -self.slack <= over <= 0:
                return levels
            movable = np.flatnonzero(levels > 0) if over > 0 else np.flatnonzero(levels < self.top)
            free = movable[~np.isin(movable, keep)]
            movable = free if len(free) else movable
            i = rng.choice(movable)
            levels[i] += -1 if over > 0 else 1
        return levels

    def project(self, shares: np.ndarray) -> np.ndarray:
        """Levels from per-part removal shares in [0, 1]: level = round(s * share * top), with the
        scale s found by bisection so that the removed parameters come closest to the target."""
        def levels_at(s):
            return np.clip(np.round(s * shares * self.top), 0, self.top).astype(int)
        lo, hi = 0.0, 1.0
        while self.params(levels_at(hi)) < self.target and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.params(levels_at(mid)) < self.target else (lo, mid)
        return min((levels_at(lo), levels_at(hi)), key=lambda lv: abs(self.params(lv) - self.target))
